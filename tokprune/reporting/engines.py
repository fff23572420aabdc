"""The engines bench (``make bench ARGS="only=engines"``): the same dev rows at batch 1 and 32
through transformers (unpruned), ONNX Runtime (unpruned), tokprune's torch hard mode (pruned) and
ONNX Runtime (pruned: decisions and token removal inside the graph), for a fixed keep schedule and
each method's best Pareto point."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig

from tokprune.core.backbone import load_bert, load_tokenizer
from tokprune.core.data import get_task
from tokprune.core.encoder import PrunableEncoder
from tokprune.core.flops import FlopsCounter
from tokprune.methods import rebuild
from tokprune.methods.static import TopKSchedule
from tokprune.serving.latency import dev_examples, interleaved, tokenized_batches

#: The fixed keep schedule: layer -> fraction of each example's real tokens kept from that layer on.
SCHEDULE = {2: 0.5, 4: 0.25}


def _engine_row(
    name: str, task: str, size: int, dev_rows: int, times: dict, outputs: dict, counter: FlopsCounter, max_length: int
) -> dict:
    """One line of the engines table from ``interleaved``'s timings and outputs."""
    torch_outs = outputs["torch_pruned"]
    flops = [counter.batch(out, max_length=max_length) for _, out in torch_outs]
    pruned, real = sum(f.pruned for f in flops), sum(f.unpruned_real for f in flops)
    kept_equal = all(
        torch.equal(kept, out.kept_counts().T.cpu()) for (_, kept), (_, out) in zip(outputs["onnx_pruned"], torch_outs)
    )
    diff = max(float((ort - ref).abs().max()) for (ort, _), (ref, _) in zip(outputs["onnx_pruned"], torch_outs))
    ms = {engine: 1e3 * statistics.median(t) for engine, t in times.items()}
    base = sum(times["transformers"])
    deployed = sum(times["onnx_unpruned"]) / sum(times["onnx_pruned"])
    return {
        "config": name,
        "task": task,
        "batch_size": size,
        "examples": dev_rows,
        **{f"ms_per_batch_{engine}": value for engine, value in ms.items()},
        **{f"speedup_{engine}": base / sum(t) for engine, t in times.items() if engine != "transformers"},
        "flops_ratio_real": pruned / real,
        # what a deployer gets: ONNX Runtime pruned vs ONNX Runtime unpruned, and which share of
        # the FLOPs reduction that is (1.0: latency fell as much as the FLOPs)
        "onnx_pruned_vs_unpruned": deployed,
        "onnx_share_of_flops_reduction": deployed * pruned / real,
        **(
            {"onnx_int8_pruned_vs_float_unpruned": sum(times["onnx_unpruned"]) / sum(times["onnx_pruned_int8"])}
            if "onnx_pruned_int8" in times
            else {}
        ),
        "kept_fraction_mean": float(
            torch.cat(
                [(out.kept_counts().T / out.lengths[:, None].clamp(min=1)).double() for _, out in torch_outs]
            ).mean()
        ),
        "onnx_kept_equal_torch": kept_equal,
        "onnx_max_abs_diff": diff,
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each operator type an ONNX file has (before ONNX Runtime's own
    session optimisations, which fold constants and shape arithmetic)."""
    import onnx

    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node).most_common())


def _unpruned_engines(bert, example, folder: Path, name: str, graphs: dict) -> dict:
    """transformers' forward and its ONNX export (fused by ONNX Runtime's transformer
    optimizer): the unpruned references."""
    from tokprune.serving.export import BertGraph, OnnxModel, export_graph

    bert = bert.eval()
    path = export_graph(BertGraph(bert), example, folder / f"{_slug(name)}-unpruned.onnx")
    graphs["onnx_unpruned"] = op_counts(path)
    return {"transformers": lambda b: bert(**b), "onnx_unpruned": OnnxModel(path, spinning=False)}


def _pruned_graphs(path: Path, graphs: dict) -> dict:
    """The exported pruned graph and its int8 quantisation, in sessions that do not spin."""
    from tokprune.serving.export import OnnxModel, quantize_graph

    int8 = quantize_graph(path, path.with_suffix(".int8.onnx"))
    graphs["onnx_pruned"], graphs["onnx_pruned_int8"] = op_counts(path), op_counts(int8)
    return {"onnx_pruned": OnnxModel(path, spinning=False), "onnx_pruned_int8": OnnxModel(int8, spinning=False)}


def task_max_length(task: str) -> int:
    from tokprune.config import compose

    return int(compose([f"task={task}"]).task.max_length)


def engines_schedule(
    cfg: DictConfig, task_name: str, schedule: dict[int, float], folder: Path, batch_sizes=(1, 32), examples: int = 256
) -> list[dict]:
    """The engines table's rows for the fixed keep schedule on the backbone of ``cfg``."""
    from tokprune.serving.export import EncoderGraph, example_inputs, export_graph

    task = get_task(task_name)
    tokenizer = load_tokenizer(cfg.model)
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    pruner = TopKSchedule(schedule)
    counter = FlopsCounter(encoder)
    dev = dev_examples(cfg, task, examples)
    example = example_inputs(tokenizer, len(task.tsv_text) == 2)
    graphs = {}
    engines = _unpruned_engines(bert, example, folder, f"schedule-{task_name}", graphs)
    engines["torch_pruned"] = lambda b: (
        None,
        encoder(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), pruner=pruner, hard=True, output="cls"),
    )
    engines |= _pruned_graphs(
        export_graph(EncoderGraph(encoder, pruner), example, folder / f"schedule-{task_name}.onnx"), graphs
    )
    name = "keep schedule " + ", ".join(f"{f:g} from layer {layer}" for layer, f in sorted(schedule.items()))
    rows, length = [], task_max_length(task_name)
    for size in batch_sizes:
        times, outputs = interleaved(engines, tokenized_batches(dev, tokenizer, size, length))
        outputs["torch_pruned"] = [(out.hidden[:, 0], out) for _, out in outputs["torch_pruned"]]
        rows.append(_engine_row(name, task_name, size, len(dev), times, outputs, counter, length) | {"graphs": graphs})
    return rows


def engines_checkpoint(
    checkpoint: str, label: str, folder: Path, glue_dir: str | None = None, batch_sizes=(1, 32), examples: int = 256
) -> list[dict]:
    """The engines table's rows for a trained checkpoint (a method's best Pareto point)."""
    from tokprune.serving.export import example_inputs, export_module

    described, module = rebuild(checkpoint)
    module = module.cpu().eval()
    cfg = described.cfg
    task = get_task(cfg.task.name)
    dev = dev_examples(cfg, task, examples, glue_dir)
    tokenizer = described.tokenizer()
    graphs = {}
    example = example_inputs(tokenizer, len(task.tsv_text) == 2)
    engines = _unpruned_engines(described.bert(), example, folder, label, graphs)
    engines["torch_pruned"] = lambda b: module(b, hard=True)
    engines |= _pruned_graphs(export_module(described, module, folder / f"{_slug(label)}.onnx"), graphs)
    counter = FlopsCounter(module.encoder, module.pruner)
    rows = []
    for size in batch_sizes:
        batches = tokenized_batches(dev, tokenizer, size, cfg.task.max_length)
        times, outputs = interleaved(engines, batches)
        row = _engine_row(label, cfg.task.name, size, len(dev), times, outputs, counter, cfg.task.max_length)
        rows.append(row | {"graphs": graphs})
    return rows


def pareto_checkpoints(reports: Path, task: str, model: str) -> tuple[list[tuple[str, str]], str]:
    """(label, checkpoint) of each method's best Pareto point in ``reports/<task>/report.json``
    (the point ``make report`` measured), and a note on what was skipped and why."""
    path = reports / task / "report.json"
    if not path.is_file():
        return [], f"{task}: no sweep report at {path}"
    report = json.loads(path.read_text())
    if report.get("model") != model:
        return [], f"{task}: {path} is for model={report.get('model')}, not {model}"
    found, skipped = [], []
    for method in report.get("methods", []):
        trial = (method.get("operating") or {}).get("best")
        checkpoint = ((method.get("speedup") or {}).get(str(trial)) or {}).get("checkpoint")
        if checkpoint and Path(checkpoint).is_file():
            found.append((f"{method['label']} best (trial {trial})", checkpoint))
        else:
            skipped.append(
                f"{method.get('label')}: {'checkpoint missing: ' + checkpoint if checkpoint else 'no best point'}"
            )
    return found, f"{task}: " + ("; ".join(skipped) if skipped else "all methods' best points measured")


#: The engines bench's tasks: short single sentences, pairs, and GLUE's longest inputs (max length 256).
ENGINE_TASKS = ("sst2", "mrpc", "rte")


def engines(
    cfg: DictConfig,
    tasks=ENGINE_TASKS,
    schedule: dict[int, float] | None = None,
    examples: int = 256,
    reports: Path = Path("reports"),
    batch_sizes=(1, 32),
) -> dict:
    """Every row of the engines table: the keep schedule, then each best Pareto point found."""
    from tokprune.serving.export import require

    require("onnxruntime")
    schedule = schedule or dict(SCHEDULE)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as folder:
        for task in tasks:
            rows += engines_schedule(cfg, task, schedule, Path(folder), batch_sizes, examples)
            points, note = pareto_checkpoints(reports, task, cfg.model.name)
            notes.append(note)
            for label, checkpoint in points:
                rows += engines_checkpoint(checkpoint, label, Path(folder), cfg.data.glue_dir, batch_sizes, examples)
    return {
        "rows": rows,
        "pareto": notes,
        "threads": torch.get_num_threads(),
        "engines": {
            "transformers": "transformers BertModel forward, unpruned (eager attention)",
            "onnx_unpruned": "that BertModel exported to ONNX, fused by ONNX Runtime's transformer optimizer "
            "(attention, skip-layer-norm, bias-GELU), ONNX Runtime CPU, unpruned",
            "torch_pruned": "tokprune hard mode in torch (packed tokens, fused attention where no pruner reads it)",
            "onnx_pruned": "tokprune export: decisions and token removal inside the graph, fused attention where "
            "no pruner reads the probabilities, skip-layer-norm and bias-GELU, ONNX Runtime",
            "onnx_pruned_int8": "that graph dynamically quantised to int8 (ONNX Runtime quantize_dynamic)",
        },
    }


ENGINES = ("transformers", "onnx_unpruned", "torch_pruned", "onnx_pruned", "onnx_pruned_int8")


ENGINE_LABELS = {
    "transformers": "transformers, unpruned",
    "onnx_unpruned": "ONNX Runtime, unpruned",
    "torch_pruned": "tokprune torch hard mode, pruned",
    "onnx_pruned": "ONNX Runtime, pruned",
    "onnx_pruned_int8": "ONNX Runtime, pruned, int8",
}


def plot_engines(table: dict, path: Path) -> None:
    """Median ms per batch of each engine, one panel per batch size, FLOPs ratio under each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    sizes = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        chosen = [r for r in rows if r["batch_size"] == size]
        x = range(len(chosen))
        width = 0.8 / len(ENGINES)
        for i, engine in enumerate(ENGINES):
            bars = ax.bar(
                [j + (i - (len(ENGINES) - 1) / 2) * width for j in x],
                [r.get(f"ms_per_batch_{engine}", 0.0) for r in chosen],
                width,
                label=ENGINE_LABELS[engine],
            )
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)  # the milliseconds on every bar
        ax.set_xticks(
            list(x),
            [f"{r['task']}\n{r['config']}\nFLOPs ratio {r['flops_ratio_real']:.2f}" for r in chosen],
            fontsize=7,
        )
        ax.set_ylabel("median ms per batch")
        ax.set_title(f"batch {size} ({chosen[0]['examples']} dev rows, {table['threads']} threads)", fontsize=9)
        ax.margins(y=0.15)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def engines_summary(table: dict) -> list[str]:
    head = (
        f"{'task':5s} {'batch':>5s}  {'transformers':>12s} {'ORT unpruned':>12s} {'torch pruned':>12s} "
        f"{'ORT pruned':>12s} {'ORT int8':>12s}  {'FLOPs':>5s}  ORT/ORT share  kept=  config"
    )
    lines = [f"engines: median ms per batch (x speedup vs transformers unpruned), {table['threads']} threads", head]
    for r in table["rows"]:
        cells = [f"{r['ms_per_batch_transformers']:12.2f}"] + [
            f"{r[f'ms_per_batch_{e}']:6.2f} x{r[f'speedup_{e}']:4.2f}" if f"ms_per_batch_{e}" in r else f"{'-':>12s}"
            for e in ENGINES[1:]
        ]
        share = (
            f"x{r['onnx_pruned_vs_unpruned']:.2f} {r['onnx_share_of_flops_reduction']:.2f}"
            if "onnx_pruned_vs_unpruned" in r
            else "-"
        )
        lines.append(
            f"{r['task']:5s} {r['batch_size']:5d}  {' '.join(cells)}  {r['flops_ratio_real']:5.3f}  {share:>13s}  "
            f"{'yes' if r['onnx_kept_equal_torch'] else 'NO ':4s} {r['config']}"
        )
    lines += graphs_summary(table)
    lines += [f"pareto points: {note}" for note in table["pareto"]]
    return lines


#: The operator types the graph table shows: the fused kernels, what is left unfused, and the
#: operators of the pruning step (ranking, packing, scattering).
GRAPH_OPS = (
    "Attention",
    "SkipLayerNormalization",
    "BiasGelu",
    "MatMul",
    "Softmax",
    "TopK",
    "Gather",
    "GatherElements",
    "ScatterElements",
    "ScatterND",
)


def graphs_summary(table: dict) -> list[str]:
    """Operator counts of each task's unpruned and pruned graphs (first row of each config)."""
    lines, seen = [f"graphs: nodes and operator counts ({', '.join(GRAPH_OPS)})"], set()
    for r in table["rows"]:
        if "graphs" not in r or (r["task"], r["config"]) in seen:
            continue
        seen.add((r["task"], r["config"]))
        for engine, ops in r["graphs"].items():
            counts = " ".join(str(ops.get(op, 0)) for op in GRAPH_OPS)
            lines.append(f"  {r['task']:5s} {engine:17s} {sum(ops.values()):5d} nodes: {counts}  ({r['config']})")
    return lines
