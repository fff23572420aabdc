"""The engines bench (``make bench ARGS="only=engines"``): the same dev rows at batch 1 and 32
through transformers (unpruned), ONNX Runtime (unpruned), tokprune's torch hard mode (pruned) and
ONNX Runtime (pruned: decisions and token removal inside the graph), for a fixed keep schedule and
each method's best Pareto point."""

from __future__ import annotations

import json
import statistics
import tempfile
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
    return {
        "config": name,
        "task": task,
        "batch_size": size,
        "examples": dev_rows,
        **{f"ms_per_batch_{engine}": value for engine, value in ms.items()},
        **{f"speedup_{engine}": base / sum(t) for engine, t in times.items() if engine != "transformers"},
        "flops_ratio_real": pruned / real,
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


def _unpruned_engines(bert, example, folder: Path, name: str) -> dict:
    """transformers' forward and its ONNX export: the unpruned references."""
    from tokprune.serving.export import BertGraph, OnnxModel, export_graph

    bert = bert.eval()
    reference = OnnxModel(
        export_graph(BertGraph(bert), example, folder / f"{_slug(name)}-unpruned.onnx"), spinning=False
    )
    return {"transformers": lambda b: bert(**b), "onnx_unpruned": reference}


def engines_schedule(
    cfg: DictConfig, task_name: str, schedule: dict[int, float], folder: Path, batch_sizes=(1, 32), examples: int = 256
) -> list[dict]:
    """The engines table's rows for the fixed keep schedule on the backbone of ``cfg``."""
    from tokprune.serving.export import EncoderGraph, OnnxModel, example_inputs, export_graph

    task = get_task(task_name)
    tokenizer = load_tokenizer(cfg.model)
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    pruner = TopKSchedule(schedule)
    counter = FlopsCounter(encoder)
    dev = dev_examples(cfg, task, examples)
    example = example_inputs(tokenizer, len(task.tsv_text) == 2)
    engines = _unpruned_engines(bert, example, folder, f"schedule-{task_name}")
    engines["torch_pruned"] = lambda b: (
        None,
        encoder(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), pruner=pruner, hard=True, output="cls"),
    )
    engines["onnx_pruned"] = OnnxModel(
        export_graph(EncoderGraph(encoder, pruner), example, folder / f"schedule-{task_name}.onnx"), spinning=False
    )
    name = "keep schedule " + ", ".join(f"{f:g} from layer {layer}" for layer, f in sorted(schedule.items()))
    rows = []
    for size in batch_sizes:
        times, outputs = interleaved(engines, tokenized_batches(dev, tokenizer, size, 512))
        outputs["torch_pruned"] = [(out.hidden[:, 0], out) for _, out in outputs["torch_pruned"]]
        rows.append(_engine_row(name, task_name, size, len(dev), times, outputs, counter, 512))
    return rows


def engines_checkpoint(
    checkpoint: str, label: str, folder: Path, glue_dir: str | None = None, batch_sizes=(1, 32), examples: int = 256
) -> list[dict]:
    """The engines table's rows for a trained checkpoint (a method's best Pareto point)."""
    from tokprune.serving.export import OnnxModel, example_inputs, export_module

    described, module = rebuild(checkpoint)
    module = module.cpu().eval()
    cfg = described.cfg
    task = get_task(cfg.task.name)
    dev = dev_examples(cfg, task, examples, glue_dir)
    tokenizer = described.tokenizer()
    engines = _unpruned_engines(described.bert(), example_inputs(tokenizer, len(task.tsv_text) == 2), folder, label)
    engines["torch_pruned"] = lambda b: module(b, hard=True)
    engines["onnx_pruned"] = OnnxModel(
        export_module(described, module, folder / f"{_slug(label)}.onnx"), spinning=False
    )
    counter = FlopsCounter(module.encoder, module.pruner)
    rows = []
    for size in batch_sizes:
        batches = tokenized_batches(dev, tokenizer, size, cfg.task.max_length)
        times, outputs = interleaved(engines, batches)
        rows.append(_engine_row(label, cfg.task.name, size, len(dev), times, outputs, counter, cfg.task.max_length))
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


def engines(
    cfg: DictConfig,
    tasks=("sst2", "mrpc"),
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
            "onnx_unpruned": "that BertModel exported to ONNX, ONNX Runtime CPU, unpruned",
            "torch_pruned": "tokprune hard mode in torch (packed tokens, fused attention where no pruner reads it)",
            "onnx_pruned": "tokprune export: decisions and token removal inside the graph, ONNX Runtime",
        },
    }


ENGINES = ("transformers", "onnx_unpruned", "torch_pruned", "onnx_pruned")


ENGINE_LABELS = {
    "transformers": "transformers, unpruned",
    "onnx_unpruned": "ONNX Runtime, unpruned",
    "torch_pruned": "tokprune torch hard mode, pruned",
    "onnx_pruned": "ONNX Runtime, pruned",
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
                [j + (i - 1.5) * width for j in x],
                [r[f"ms_per_batch_{engine}"] for r in chosen],
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
        f"{'ORT pruned':>12s}  {'FLOPs':>5s}  kept=  config"
    )
    lines = [f"engines: median ms per batch (x speedup vs transformers unpruned), {table['threads']} threads", head]
    for r in table["rows"]:
        cells = [f"{r['ms_per_batch_transformers']:12.2f}"] + [
            f"{r[f'ms_per_batch_{e}']:6.2f} x{r[f'speedup_{e}']:4.2f}" for e in ENGINES[1:]
        ]
        lines.append(
            f"{r['task']:5s} {r['batch_size']:5d}  {' '.join(cells)}  {r['flops_ratio_real']:5.3f}  "
            f"{'yes' if r['onnx_kept_equal_torch'] else 'NO ':4s} {r['config']}"
        )
    lines += [f"pareto points: {note}" for note in table["pareto"]]
    return lines
