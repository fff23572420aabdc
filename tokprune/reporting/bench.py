"""Benchmarks (``make bench``): what the machinery costs and what pruning buys on a CPU.

1. Callback overhead: training-step time with the token-pruning callback on vs off, in one
   process, in alternating blocks of steps (after each length's FLOPs are cached; the
   one-time tracing cost is reported on its own).
2. Realised speedup: hard-mode inference latency of a fixed keep schedule against the
   unpruned encoder, at batch 1 and 32, on real dev rows, beside the FLOPs reduction of
   the same inputs. Timings alternate pruned/unpruned per batch so load on the machine
   hits both alike; figures are ratios measured in one run.
3. Engines (``engines``, on SST-2, MRPC and RTE): the same rows at batch 1 and 32 through five engines: unpruned in
   transformers (``BertModel``), unpruned in ONNX Runtime (that model exported), pruned in
   tokprune's torch hard mode, pruned in ONNX Runtime (``tokprune.serving.export``: decisions and
   token removal inside the graph) and that graph quantised to int8, for the fixed keep schedule
   and, when a sweep's report exists (``reports/<task>/report.json`` of the same model), for each method's best Pareto
   point (its checkpoint; the unpruned references are the same architecture, whose latency
   does not depend on the weights). Each with its fvcore FLOPs ratio at real length, and
   whether ONNX Runtime kept exactly the tokens torch kept.
4. Latency by length (``lengths``, ``reporting.lengths``): ONNX Runtime pruned vs unpruned at 16
   to 256 tokens, batch 1 and 32, and the crossover length from which pruning pays.
5. Training steps (``steps``): each method's training step under protocol=shared against the
   unpruned baseline's, on SST-2 at batch 32, methods taking turns in one run.

Results go to ``reports/bench/bench.json``, ``reports/bench/bench.png``,
``reports/bench/engines.png`` and ``reports/bench/lengths.png``. ``only=`` (e.g.
``only=engines``) reruns some sections and keeps the others from the existing JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from tokprune.core.backbone import load_bert, load_tokenizer
from tokprune.core.data import get_task
from tokprune.core.encoder import PrunableEncoder
from tokprune.core.flops import FlopsCounter
from tokprune.errors import UsageError
from tokprune.methods import build_method
from tokprune.methods.static import TopKSchedule
from tokprune.reporting.engines import ENGINE_TASKS, SCHEDULE, engines, engines_summary, plot_engines
from tokprune.reporting.lengths import latency_by_length, lengths_summary, plot_lengths
from tokprune.serving.latency import alternate, dev_examples, timed, tokenized_batches
from tokprune.training.callbacks import TokenPruningCallback
from tokprune.training.train import build_datamodule


def speedup(
    cfg: DictConfig, task_name: str, schedule: dict[int, float], batch_sizes=(1, 32), examples=256
) -> list[dict]:
    """Hard-mode latency of ``schedule`` vs the unpruned encoder on real dev rows."""
    task = get_task(task_name)
    tokenizer = load_tokenizer(cfg.model)
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    counter = FlopsCounter(encoder)
    dev = dev_examples(cfg, task, examples)
    pruner = TopKSchedule(schedule)
    results = []
    for size in batch_sizes:
        batches = tokenized_batches(dev, tokenizer, size, 512)
        t_pruned, t_unpruned, t_backbone, outputs = alternate(encoder, pruner, batches, other=lambda b: bert(**b))
        flops = [counter.batch(out, max_length=out.padding.shape[1]) for out in outputs]
        flops_pruned = sum(f.pruned for f in flops)
        flops_unpruned = sum(f.unpruned_real for f in flops)
        flops_reduction = flops_unpruned / flops_pruned
        wall = sum(t_unpruned) / sum(t_pruned)
        results.append(
            {
                "task": task_name,
                "batch_size": size,
                "batches": len(batches),
                "examples": len(dev),
                "ms_per_batch_pruned": 1e3 * statistics.median(t_pruned),
                "ms_per_batch_unpruned": 1e3 * statistics.median(t_unpruned),
                "ms_per_batch_backbone_forward": 1e3 * statistics.median(t_backbone),
                "flops_ratio_real": flops_pruned / flops_unpruned,
                "flops_reduction": flops_reduction,
                "wall_speedup": wall,
                "wall_speedup_vs_backbone_forward": sum(t_backbone) / sum(t_pruned),
                "speedup_over_flops_reduction": wall / flops_reduction,
            }
        )
    return results


class _StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def step_times(module, datamodule, callbacks: list, steps: int, gradient_clip_val=None) -> list[float]:
    """Seconds of each training step of one block of ``steps`` (a fresh Trainer continuing the same
    module), the first left out: it pays the loader's start-up."""
    timer = _StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        gradient_clip_val=gradient_clip_val,
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times[1:]


def layer_latency_by_length(cfg: DictConfig, lengths=(4, 8, 16, 32, 64, 128), repeats: int = 50) -> list[dict]:
    """Where batch-1 time goes: one layer's latency against its FLOPs as the input shrinks.

    Wall time only follows FLOPs once a layer's matmuls are big enough to outweigh the fixed
    cost of each op; below that, dropping tokens saves FLOPs but little time.
    """
    encoder = PrunableEncoder(load_bert(cfg.model)).eval()
    counter = FlopsCounter(encoder)
    layer = encoder.layers[0]
    rows = []
    with torch.inference_mode():
        for length in lengths:
            hidden = torch.randn(1, length, encoder.config.hidden_size)
            bias = hidden.new_zeros(1, 1, 1, length)
            for _ in range(5):
                encoder.run_layer(layer, hidden, bias)
            times = [timed(lambda: encoder.run_layer(layer, hidden, bias)) for _ in range(repeats)]
            rows.append({"length": length, "ms": 1e3 * statistics.median(times), "flops": counter.layer(0, length)})
    top = rows[-1]
    for row in rows:
        row["time_fraction_of_longest"] = row["ms"] / top["ms"]
        row["flops_fraction_of_longest"] = row["flops"] / top["flops"]
    return rows


def callback_overhead(cfg: DictConfig, steps_per_block: int = 10, rounds: int = 3) -> dict:
    """Median training-step time with the callback on / off, alternating blocks in one run."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, load_tokenizer(cfg.model))
    datamodule.setup("fit")
    module = build_method(cfg, load_bert(cfg.model), get_task(cfg.task.name))
    callback = TokenPruningCallback(cfg.task.max_length)
    callback.counter = FlopsCounter(module.encoder, module.pruner)
    trace_seconds = timed(lambda: callback.counter.per_layer(torch.arange(1, cfg.task.max_length + 1)[None]))
    timings: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("on", "off"):
            timings[mode].extend(step_times(module, datamodule, [callback] if mode == "on" else [], steps_per_block))
    on, off = statistics.median(timings["on"]), statistics.median(timings["off"])
    return {
        "task": cfg.task.name,
        "batch_size": cfg.train.batch_size,
        "steps_timed_per_mode": len(timings["on"]),
        "median_step_ms_callback_on": 1e3 * on,
        "median_step_ms_callback_off": 1e3 * off,
        "ratio_on_over_off": on / off,
        "one_time_trace_seconds_all_lengths": trace_seconds,
        "lengths_traced": cfg.task.max_length,
    }


STEP_METHODS = ("none", "gate", "transkimmer", "top", "static")


def training_steps(
    cfg: DictConfig,
    methods=STEP_METHODS,
    steps_per_block: int = 8,
    rounds: int = 3,
    rows: int = 1024,
    target_flops: float = 0.45,
) -> dict:
    """Median training-step time of each method (protocol=shared at ``target_flops``, its cpu sweep's
    settings) against the unpruned baseline's step, on SST-2 at the config's batch size, methods
    taking turns in blocks of steps in one run. The teacher is the pretrained encoder with a fresh
    head saved as a baseline checkpoint (step time does not depend on its weights); its outputs per
    training row are cached first (that one-time cost is reported on its own)."""
    from tokprune.config import compose
    from tokprune.methods.checkpoint import describe

    settings = {
        "gate": ["method.gate_lr=1e-2", "method.straight_through=true", "method.inference=expected"],
        "transkimmer": ["method.predictor_lr=1e-3"],
        "top": ["method.reg_lr=0.1"],
    }
    tokenizer = load_tokenizer(cfg.model)
    common = [
        f"model={cfg.model.name}",
        "task=sst2",
        "budget=cpu",
        f"seed={cfg.seed}",
        f"data.train_subset={rows}",
        f"protocol.target_flops={target_flops}",
        f"data.glue_dir={cfg.data.glue_dir}",
    ]
    layers = load_bert(cfg.model).config.num_hidden_layers
    settings["static"] = [f"method.first_pruned_layer={min(2, layers - 1)}"]  # 2 on MiniLM; 1 on a 2-layer model
    modules, cache_seconds = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        base_cfg = compose(["method=none", *common])
        baseline = build_method(base_cfg, load_bert(cfg.model), get_task("sst2"))
        path = Path(folder) / "baseline.ckpt"
        torch.save(
            {
                "state_dict": baseline.state_dict(),
                "tokprune": describe(base_cfg, baseline.encoder.config, tokenizer, None),
            },
            path,
        )
        for method in methods:
            run_cfg = compose(
                [f"method={method}", *common, f"protocol.baseline_checkpoint={path}", *settings.get(method, [])]
            )
            datamodule = build_datamodule(run_cfg, tokenizer)
            datamodule.setup("fit")
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            module = build_method(run_cfg, load_bert(cfg.model), get_task("sst2"))
            cache_seconds[method] = timed(lambda: module.prepare_fit(datamodule))
            counting = TokenPruningCallback(run_cfg.task.max_length)
            counting.counter = FlopsCounter(module.encoder, module.pruner)
            counting.counter.per_layer(torch.arange(1, run_cfg.task.max_length + 1)[None])  # traced before timing
            modules[method] = (module, datamodule, counting)
        timings: dict[str, list[float]] = {method: [] for method in methods}
        for _ in range(rounds):
            for method, (module, datamodule, counting) in modules.items():
                timings[method].extend(
                    step_times(module, datamodule, [counting], steps_per_block, cfg.train.gradient_clip_val)
                )
    base = statistics.median(timings["none"])
    return {
        "task": "sst2",
        "batch_size": cfg.train.batch_size,
        "protocol": "shared",
        "target_flops": target_flops,
        "steps_timed_per_method": len(timings["none"]),
        "rows": [
            {
                "method": method,
                "median_step_ms": 1e3 * statistics.median(times),
                "ratio_to_baseline": statistics.median(times) / base,
                "one_time_prepare_seconds": cache_seconds[method],
            }
            for method, times in timings.items()
        ],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["speedup"]
    labels = [f"{r['task']}\nbatch {r['batch_size']}" for r in rows]
    x = range(len(rows))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 1.6, 1]})
    lat = results["layer_latency_batch1"]
    middle.plot([r["length"] for r in lat], [r["flops_fraction_of_longest"] for r in lat], "o-", label="FLOPs")
    middle.plot([r["length"] for r in lat], [r["time_fraction_of_longest"] for r in lat], "s-", label="wall time")
    middle.set_xscale("log", base=2)
    middle.set_yscale("log")
    middle.set_xlabel("tokens in the layer (batch 1)")
    middle.set_ylabel(f"fraction of the {lat[-1]['length']}-token layer")
    middle.set_title("one layer: time vs FLOPs as tokens drop", fontsize=9)
    middle.legend(fontsize=8)
    left.bar(
        [i - 0.2 for i in x], [r["flops_reduction"] for r in rows], 0.4, label="FLOPs reduction (fvcore, real length)"
    )
    left.bar([i + 0.2 for i in x], [r["wall_speedup"] for r in rows], 0.4, label="wall-time speedup (hard mode, CPU)")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xticks(list(x), labels)
    left.set_ylabel("x vs unpruned encoder")
    left.set_title(f"Keep schedule {results['schedule']} (fraction of real tokens from layer)", fontsize=9)
    left.legend(fontsize=8)
    over = results["callback_overhead"]
    right.bar(
        ["off", "on"],
        [over["median_step_ms_callback_off"], over["median_step_ms_callback_on"]],
        color=["grey", "tab:blue"],
    )
    right.set_title(f"train step, callback on/off: x{over['ratio_on_over_off']:.3f}", fontsize=9)
    right.set_ylabel("median ms per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("speedup", "layers", "callback", "engines", "lengths", "steps")


def run_bench(
    cfg: DictConfig,
    out_dir: Path,
    tasks=("sst2", "mrpc"),
    schedule: dict[int, float] | None = None,
    examples: int = 256,
    steps_per_block: int = 10,
    rounds: int = 3,
    only: tuple[str, ...] | None = None,
    reports: Path = Path("reports"),
) -> dict:
    """Run the sections in ``only`` (default: all of ``SECTIONS``); with a subset, the other
    sections are kept from ``out_dir/bench.json`` when it holds the same model's results."""
    schedule = schedule or dict(SCHEDULE)
    only = tuple(only or SECTIONS)
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        raise UsageError(f"bench only= takes {', '.join(SECTIONS)} (comma-separated), not '{unknown[0]}'")
    path = out_dir / "bench.json"
    results = json.loads(path.read_text()) if set(only) != set(SECTIONS) and path.is_file() else {}
    if results.get("model") != cfg.model.name or results.get("schedule") != {str(k): v for k, v in schedule.items()}:
        results = {}
    results |= {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": cfg.model.name,
        "schedule": {str(k): v for k, v in schedule.items()},
        "flops_convention": "fvcore: one fused multiply-add = one FLOP",
    }
    if "speedup" in only:
        results["speedup"] = [row for task in tasks for row in speedup(cfg, task, schedule, examples=examples)]
    if "layers" in only:
        results["layer_latency_batch1"] = layer_latency_by_length(cfg)
    if "callback" in only:
        results["callback_overhead"] = callback_overhead(cfg, steps_per_block, rounds)
    if "engines" in only:
        results["engines"] = engines(
            cfg, (*tasks, *(t for t in ENGINE_TASKS if t not in tasks)), schedule, examples, reports
        )
    if "lengths" in only:
        with tempfile.TemporaryDirectory() as folder:
            results["lengths"] = latency_by_length(cfg, schedule, Path(folder))
    if "steps" in only:
        results["training_steps"] = training_steps(cfg, steps_per_block=steps_per_block, rounds=rounds)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    if all(key in results for key in ("speedup", "layer_latency_batch1", "callback_overhead")):
        plot(results, out_dir / "bench.png")
    if "engines" in results:
        plot_engines(results["engines"], out_dir / "engines.png")
    if "lengths" in results:
        plot_lengths(results["lengths"], out_dir / "lengths.png")
    return results


def summary(results: dict) -> str:
    lines = []
    for r in results.get("speedup", []):
        lines.append(
            f"{r['task']:5s} batch {r['batch_size']:2d}: FLOPs x{r['flops_reduction']:.2f} fewer, "
            f"wall x{r['wall_speedup']:.2f} "
            f"faster ({r['ms_per_batch_unpruned']:.1f} -> {r['ms_per_batch_pruned']:.1f} ms/batch), "
            f"speedup/FLOPs-reduction {r['speedup_over_flops_reduction']:.2f}"
        )
    if "layer_latency_batch1" in results:
        lat = " ".join(
            f"{r['length']}:{r['ms']:.2f}ms/{r['flops_fraction_of_longest']:.3f}F"
            for r in results["layer_latency_batch1"]
        )
        lines.append(f"one layer at batch 1, tokens:latency/FLOPs-fraction: {lat}")
    if "callback_overhead" in results:
        o = results["callback_overhead"]
        lines.append(
            f"callback overhead: {o['median_step_ms_callback_on']:.0f} vs "
            f"{o['median_step_ms_callback_off']:.0f} ms/step "
            f"= x{o['ratio_on_over_off']:.3f}; one-time tracing of {o['lengths_traced']} lengths "
            f"{o['one_time_trace_seconds_all_lengths']:.1f} s"
        )
    if "engines" in results:
        lines += engines_summary(results["engines"])
    if "lengths" in results:
        lines += lengths_summary(results["lengths"])
    if "training_steps" in results:
        t = results["training_steps"]
        lines.append(
            f"training step, {t['task']} batch {t['batch_size']}, protocol={t['protocol']} target "
            f"{t['target_flops']} (ms, x the baseline's): "
            + ", ".join(f"{r['method']} {r['median_step_ms']:.0f} (x{r['ratio_to_baseline']:.2f})" for r in t["rows"])
        )
    return "\n".join(lines)
