"""Where pruning pays (``make bench ARGS="only=lengths"``): ONNX Runtime latency of the fixed keep
schedule's pruned graph against the unpruned graph at 16 to 256 tokens, batch 1 and 32.

Why by length: at batch 1 a short input is bound by reading the weights and by per-operator
overhead, not by arithmetic, so removing tokens saves little time even where it removes many
FLOPs; the longer the input, the closer latency follows FLOPs. The crossover is the shortest
length from which the pruned graph is faster (and stays faster at every longer length measured).

Inputs are real text at exact lengths: RTE dev sentences (GLUE's longest) tokenised once and cut
into rows of ``length`` tokens ([CLS] ... [SEP], no padding), different rows from different
offsets. Both graphs are the deployed ones (``export_graph``'s fused graphs), timed in turns per
batch (``interleaved``) in sessions that do not spin.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig

from tokprune.core.backbone import load_bert, load_tokenizer
from tokprune.core.data import get_task
from tokprune.core.encoder import PrunableEncoder
from tokprune.core.flops import FlopsCounter
from tokprune.methods.static import TopKSchedule
from tokprune.serving.latency import dev_examples, interleaved

LENGTHS = (16, 32, 64, 128, 256)
#: Rows timed per (length, batch size): enough batches for a median at batch 1, a few large ones
#: at batch 32 (a 256-token batch of 32 takes about a second on 2 cores). Speedups are ratios of
#: medians.
ROWS = {1: 96, 32: 128}


def token_pool(cfg: DictConfig, tokenizer) -> list[int]:
    """The RTE dev set's text as one run of token ids (no special tokens), read and tokenised once."""
    dev = dev_examples(cfg, get_task("rte"), 277)
    return [
        t for text in (*dev["text_a"], *dev["text_b"]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]
    ]


def token_rows(pool: list[int], tokenizer, length: int, rows: int) -> torch.Tensor:
    """``rows`` x ``length`` token ids cut from ``pool`` at spread offsets, each [CLS] + text + [SEP]."""
    body = length - 2
    step = max(1, (len(pool) - body) // rows)
    ids = [[tokenizer.cls_token_id, *pool[i * step : i * step + body], tokenizer.sep_token_id] for i in range(rows)]
    return torch.tensor(ids, dtype=torch.long)


def latency_by_length(
    cfg: DictConfig, schedule: dict[int, float], folder: Path, lengths=LENGTHS, batch_sizes=(1, 32)
) -> dict:
    from tokprune.serving.export import BertGraph, EncoderGraph, OnnxModel, example_inputs, export_graph

    tokenizer = load_tokenizer(cfg.model)
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    pruner = TopKSchedule(schedule)
    counter = FlopsCounter(encoder)
    example = example_inputs(tokenizer, True)
    engines = {
        "onnx_unpruned": OnnxModel(export_graph(BertGraph(bert), example, folder / "unpruned.onnx"), spinning=False),
        "onnx_pruned": OnnxModel(
            export_graph(EncoderGraph(encoder, pruner), example, folder / "pruned.onnx"), spinning=False
        ),
    }
    rows, pool = [], token_pool(cfg, tokenizer)
    for size in batch_sizes:
        for length in lengths:
            ids = token_rows(pool, tokenizer, length, ROWS.get(size, 2 * size))
            batches = [
                {
                    "input_ids": chunk,
                    "attention_mask": torch.ones_like(chunk),
                    "token_type_ids": torch.zeros_like(chunk),
                }
                for chunk in ids.split(size)
            ]
            times, _ = interleaved(engines, batches, warmup=1)
            with torch.inference_mode():
                first = batches[0]
                out = encoder(first["input_ids"], first["attention_mask"], first["token_type_ids"], pruner=pruner)
            flops = counter.batch(out, max_length=length)
            # the ratio of medians: with a few dozen batches per point, one stall of the shared
            # machine moves a ratio of sums by more than the effect measured
            speedup = statistics.median(times["onnx_unpruned"]) / statistics.median(times["onnx_pruned"])
            ratio = flops.pruned / flops.unpruned_real
            rows.append(
                {
                    "length": length,
                    "batch_size": size,
                    "batches": len(batches),
                    "ms_per_batch_onnx_unpruned": 1e3 * statistics.median(times["onnx_unpruned"]),
                    "ms_per_batch_onnx_pruned": 1e3 * statistics.median(times["onnx_pruned"]),
                    "speedup": speedup,
                    "flops_ratio_real": ratio,
                    "share_of_flops_reduction": speedup * ratio,
                }
            )
    return {
        "rows": rows,
        "crossover": {str(size): crossover([r for r in rows if r["batch_size"] == size]) for size in batch_sizes},
        "schedule": {str(k): v for k, v in schedule.items()},
        "threads": torch.get_num_threads(),
        "inputs": "RTE dev text cut to exact lengths, no padding",
    }


def crossover(rows: list[dict]) -> int | None:
    """The shortest measured length from which the pruned graph is faster at every longer one."""
    best = None
    for row in sorted(rows, key=lambda r: -r["length"]):
        if row["speedup"] <= 1.0:
            break
        best = row["length"]
    return best


def plot_lengths(table: dict, path: Path) -> None:
    """Speedup (ONNX Runtime pruned vs unpruned) against input length, a line per batch size, with
    the FLOPs reduction it would be if latency followed FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for size in sorted({r["batch_size"] for r in table["rows"]}):
        rows = sorted((r for r in table["rows"] if r["batch_size"] == size), key=lambda r: r["length"])
        x = [r["length"] for r in rows]
        line = ax.plot(x, [r["speedup"] for r in rows], marker="o", label=f"batch {size}: measured speedup")[0]
        ax.plot(
            x,
            [1 / r["flops_ratio_real"] for r in rows],
            linestyle="--",
            color=line.get_color(),
            alpha=0.6,
            label=f"batch {size}: FLOPs reduction",
        )
        cross = table["crossover"].get(str(size))
        if cross:
            ax.axvline(cross, color=line.get_color(), linestyle=":", alpha=0.7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        sorted({r["length"] for r in table["rows"]}), [str(v) for v in sorted({r["length"] for r in table["rows"]})]
    )
    ax.set_xlabel("tokens per input")
    ax.set_ylabel("ONNX Runtime: unpruned ms / pruned ms")
    schedule = ", ".join(f"{f:g} from layer {layer}" for layer, f in sorted(table["schedule"].items()))
    ax.set_title(f"Where pruning pays: keep schedule {schedule}, {table['threads']} threads", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def lengths_summary(table: dict) -> list[str]:
    lines = [f"latency by length, ONNX Runtime pruned vs unpruned ({table['inputs']}, {table['threads']} threads):"]
    for r in table["rows"]:
        lines.append(
            f"  batch {r['batch_size']:2d} {r['length']:4d} tokens: {r['ms_per_batch_onnx_unpruned']:8.2f} -> "
            f"{r['ms_per_batch_onnx_pruned']:8.2f} ms  x{r['speedup']:.2f} (FLOPs ratio {r['flops_ratio_real']:.3f}, "
            f"{r['share_of_flops_reduction']:.2f} of the reduction)"
        )
    for size, length in table["crossover"].items():
        lines.append(f"  crossover at batch {size}: " + (f"{length} tokens" if length else "not within the lengths"))
    return lines
