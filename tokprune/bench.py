"""Benchmarks (``make bench``): what the machinery costs and what pruning buys on a CPU.

1. Callback overhead: training-step time with the token-pruning callback on vs off, in one
   process, in alternating blocks of steps (after each length's FLOPs are cached; the
   one-time tracing cost is reported on its own).
2. Realised speedup: hard-mode inference latency of a fixed keep schedule against the
   unpruned encoder, at batch 1 and 32, on real dev rows, beside the FLOPs reduction of
   the same inputs. Timings alternate pruned/unpruned per batch so load on the machine
   hits both alike; figures are ratios measured in one run.

Results go to ``reports/bench/bench.json`` and ``reports/bench/bench.png``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from tokprune.backbone import load_bert, load_tokenizer
from tokprune.callbacks import TokenPruningCallback
from tokprune.data import get_task, load_splits, seeded_subset
from tokprune.checkpoint import Described, rebuild
from tokprune.encoder import KeepAll, PrunableEncoder, PruneContext, Pruner
from tokprune.flops import FlopsCounter
from tokprune.methods import build_method
from tokprune.methods.base import PruningModule
from tokprune.train import build_datamodule


class KeepSchedule(Pruner):
    """Static top-k: from layer l on, keep ``fraction`` of each example's real tokens,
    the ones that received the most attention in the previous layer (PoWER-BERT style)."""

    def __init__(self, schedule: dict[int, float]):
        super().__init__()
        self.schedule = schedule

    def wants_attention(self, layer: int) -> bool:
        return layer in self.schedule

    def forward(self, ctx: PruneContext) -> torch.Tensor:
        if ctx.layer not in self.schedule:
            return ctx.keep
        scores = ctx.received_attention().masked_fill(~ctx.live, -1.0)
        target = torch.ceil(ctx.lengths * self.schedule[ctx.layer]).long().clamp(min=1)
        ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
        return (ranks < target[:, None]).to(ctx.keep.dtype)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _batches(rows: dict, tokenizer, size: int, max_length: int) -> list[dict]:
    texts = [rows["text_a"]] + ([rows["text_b"]] if "text_b" in rows.column_names else [])
    out = []
    for i in range(0, len(texts[0]), size):
        chunk = [t[i : i + size] for t in texts]
        enc = tokenizer(*chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


def _alternate(encoder: PrunableEncoder, pruner: Pruner, batches: list[dict], other=None):
    """Hard-mode forwards with ``pruner`` and unpruned (and ``other(batch)`` if given), timed
    alternately per batch after two warm-up batches, so load on the machine hits all alike.

    Returns (pruned seconds, unpruned seconds, other seconds, the pruned outputs).
    """
    unpruned = KeepAll()
    t_pruned, t_unpruned, t_other, outputs = [], [], [], []
    with torch.inference_mode():
        for batch in batches[:2]:  # warm-up
            encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), pruner=pruner)
        for batch in batches:
            args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            t_pruned.append(_time(lambda: outputs.append(encoder(*args, pruner=pruner))))
            t_unpruned.append(_time(lambda: encoder(*args, pruner=unpruned)))
            if other is not None:
                t_other.append(_time(lambda: other(batch)))
    return t_pruned, t_unpruned, t_other, outputs


def speedup(cfg: DictConfig, task_name: str, schedule: dict[int, float], batch_sizes=(1, 32), examples=256) -> list[dict]:
    """Hard-mode latency of ``schedule`` vs the unpruned encoder on real dev rows."""
    task = get_task(task_name)
    tokenizer = load_tokenizer(cfg.model)
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    counter = FlopsCounter(encoder)
    dev = seeded_subset(load_splits(task, cfg.data.glue_dir, cfg.data.hub_dataset)["dev"], examples, cfg.seed)
    pruner = KeepSchedule(schedule)
    results = []
    for size in batch_sizes:
        batches = _batches(dev, tokenizer, size, 512)
        t_pruned, t_unpruned, t_backbone, outputs = _alternate(encoder, pruner, batches, other=lambda b: bert(**b))
        flops = [counter.batch(out, max_length=out.hidden.shape[1]) for out in outputs]
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


def checkpoint_speedup(checkpoint: str, glue_dir: str | None = None, examples: int = 64,
                       batch_sizes=(1,)) -> list[dict]:
    """``trained_speedup`` of the model in a checkpoint file."""
    described, module = rebuild(checkpoint)
    return trained_speedup(described, module, glue_dir, examples, batch_sizes)


def trained_speedup(described: Described, module: PruningModule, glue_dir: str | None = None, examples: int = 64,
                    batch_sizes=(1,)) -> list[dict]:
    """Hard-mode latency of a trained model's own pruner vs KeepAll on the same weights, on
    ``examples`` seeded real dev rows of its task, at each batch size: what its savings buy
    on a CPU. The task, max length and (unless ``glue_dir`` is given) data come from the
    checkpoint's description; ``module`` must be on the CPU."""
    cfg = described.cfg
    task = get_task(cfg.task.name)
    rows = load_splits(task, cfg.data.glue_dir if glue_dir is None else glue_dir, cfg.data.hub_dataset)["dev"]
    dev = seeded_subset(rows, examples, cfg.seed)
    tokenizer = described.tokenizer()
    return [latency(module.encoder, module.pruner, _batches(dev, tokenizer, size, cfg.task.max_length))
            | {"examples": len(dev), "batch_size": size} for size in batch_sizes]


def latency(encoder: PrunableEncoder, pruner: Pruner, batches: list[dict]) -> dict:
    """Median hard-mode time per batch with ``pruner`` and unpruned, timed alternately."""
    t_pruned, t_unpruned, _, outputs = _alternate(encoder, pruner, batches)
    kept = [out.kept_fraction().mean() for out in outputs]
    return {
        "ms_per_batch_pruned": 1e3 * statistics.median(t_pruned),
        "ms_per_batch_unpruned": 1e3 * statistics.median(t_unpruned),
        "wall_speedup": sum(t_unpruned) / sum(t_pruned),
        "kept_fraction_mean": float(torch.stack(kept).mean()),
        "threads": torch.get_num_threads(),
    }


class _StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


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
            times = [_time(lambda: encoder.run_layer(layer, hidden, bias)) for _ in range(repeats)]
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
    trace_seconds = _time(lambda: callback.counter.per_layer(torch.arange(1, cfg.task.max_length + 1)[None]))
    timings: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("on", "off"):
            timer = _StepTimer()
            callbacks = [callback, timer] if mode == "on" else [timer]
            trainer = L.Trainer(
                max_steps=steps_per_block, limit_val_batches=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
            )
            trainer.fit(module, datamodule=datamodule)
            timings[mode].extend(timer.times[1:])  # the first step of a block pays loader start-up
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
    left.bar([i - 0.2 for i in x], [r["flops_reduction"] for r in rows], 0.4, label="FLOPs reduction (fvcore, real length)")
    left.bar([i + 0.2 for i in x], [r["wall_speedup"] for r in rows], 0.4, label="wall-time speedup (hard mode, CPU)")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xticks(list(x), labels)
    left.set_ylabel("x vs unpruned encoder")
    left.set_title(f"Keep schedule {results['schedule']} (fraction of real tokens from layer)", fontsize=9)
    left.legend(fontsize=8)
    over = results["callback_overhead"]
    right.bar(["off", "on"], [over["median_step_ms_callback_off"], over["median_step_ms_callback_on"]], color=["grey", "tab:blue"])
    right.set_title(f"train step, callback on/off: x{over['ratio_on_over_off']:.3f}", fontsize=9)
    right.set_ylabel("median ms per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(
    cfg: DictConfig,
    out_dir: Path,
    tasks=("sst2", "mrpc"),
    schedule: dict[int, float] | None = None,
    examples: int = 256,
    steps_per_block: int = 10,
    rounds: int = 3,
) -> dict:
    schedule = schedule or {2: 0.5, 4: 0.25}
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": cfg.model.name,
        "schedule": {str(k): v for k, v in schedule.items()},
        "flops_convention": "fvcore: one fused multiply-add = one FLOP",
        "speedup": [row for task in tasks for row in speedup(cfg, task, schedule, examples=examples)],
        "layer_latency_batch1": layer_latency_by_length(cfg),
        "callback_overhead": callback_overhead(cfg, steps_per_block, rounds),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_dir / "bench.png")
    return results


def summary(results: dict) -> str:
    lines = []
    for r in results["speedup"]:
        lines.append(
            f"{r['task']:5s} batch {r['batch_size']:2d}: FLOPs x{r['flops_reduction']:.2f} fewer, wall x{r['wall_speedup']:.2f} "
            f"faster ({r['ms_per_batch_unpruned']:.1f} -> {r['ms_per_batch_pruned']:.1f} ms/batch), "
            f"speedup/FLOPs-reduction {r['speedup_over_flops_reduction']:.2f}"
        )
    lat = " ".join(f"{r['length']}:{r['ms']:.2f}ms/{r['flops_fraction_of_longest']:.3f}F" for r in results["layer_latency_batch1"])
    lines.append(f"one layer at batch 1, tokens:latency/FLOPs-fraction: {lat}")
    o = results["callback_overhead"]
    lines.append(
        f"callback overhead: {o['median_step_ms_callback_on']:.0f} vs {o['median_step_ms_callback_off']:.0f} ms/step "
        f"= x{o['ratio_on_over_off']:.3f}; one-time tracing of {o['lengths_traced']} lengths {o['one_time_trace_seconds_all_lengths']:.1f} s"
    )
    return "\n".join(lines)
