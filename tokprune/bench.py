"""Benchmarks (``make bench``): what the machinery costs and what pruning buys on a CPU.

1. Callback overhead: training-step time with the token-pruning callback on vs off, in one
   process, in alternating blocks of steps (after each length's FLOPs are cached; the
   one-time tracing cost is reported on its own).
2. Realised speedup: hard-mode inference latency of a fixed keep schedule against the
   unpruned encoder, at batch 1 and 32, on real dev rows, beside the FLOPs reduction of
   the same inputs. Timings alternate pruned/unpruned per batch so load on the machine
   hits both alike; figures are ratios measured in one run.
3. Engines (``engines``): the same rows at batch 1 and 32 through four engines: unpruned in
   transformers (``BertModel``), unpruned in ONNX Runtime (that model exported), pruned in
   tokprune's torch hard mode and pruned in ONNX Runtime (``tokprune.export``: decisions and
   token removal inside the graph), for the fixed keep schedule and, when a sweep's report
   exists (``reports/<task>/report.json`` of the same model), for each method's best Pareto
   point (its checkpoint; the unpruned references are the same architecture, whose latency
   does not depend on the weights). Each with its fvcore FLOPs ratio at real length, and
   whether ONNX Runtime kept exactly the tokens torch kept.
4. Training steps (``steps``): each method's training step under protocol=shared against the
   unpruned baseline's, on SST-2 at batch 32, methods taking turns in one run.

Results go to ``reports/bench/bench.json``, ``reports/bench/bench.png`` and
``reports/bench/engines.png``. ``only=`` (e.g. ``only=engines``) reruns some sections and keeps
the others from the existing JSON.
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

from tokprune.backbone import load_bert, load_tokenizer
from tokprune.callbacks import TokenPruningCallback
from tokprune.data import GlueTask, get_task, load_splits, seeded_subset
from tokprune.checkpoint import Described, rebuild
from tokprune.encoder import KeepAll, PrunableEncoder, Pruner
from tokprune.errors import UsageError
from tokprune.flops import FlopsCounter
from tokprune.methods import build_method
from tokprune.methods.base import PruningModule
from tokprune.methods.static import TopKSchedule
from tokprune.train import build_datamodule


#: The fixed keep schedule: layer -> fraction of each example's real tokens kept from that layer on.
SCHEDULE = {2: 0.5, 4: 0.25}


#: Batch sizes every trained model's latency is reported at (``eval``, ``report``): one request, and a
#: batch that fills the CPU's vector units.
LATENCY_BATCH_SIZES = (1, 32)


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
            encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), pruner=pruner,
                    output="cls")
        for batch in batches:
            args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            # output="cls": what a classifier needs, so nothing is scattered back to full length
            t_pruned.append(_time(lambda: outputs.append(encoder(*args, pruner=pruner, output="cls"))))
            t_unpruned.append(_time(lambda: encoder(*args, pruner=unpruned, output="cls")))
            if other is not None:
                t_other.append(_time(lambda: other(batch)))
    return t_pruned, t_unpruned, t_other, outputs


def dev_examples(cfg: DictConfig, task: GlueTask, examples: int, glue_dir: str | None = None) -> datasets.Dataset:
    """``examples`` seeded rows of ``task``'s dev split (its train file is not read), from
    ``glue_dir`` when given, else from ``cfg.data``."""
    rows = load_splits(task, cfg.data.glue_dir if glue_dir is None else glue_dir, cfg.data.hub_dataset, ("dev",))
    return seeded_subset(rows["dev"], examples, cfg.seed)


def speedup(cfg: DictConfig, task_name: str, schedule: dict[int, float], batch_sizes=(1, 32), examples=256) -> list[dict]:
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
        batches = _batches(dev, tokenizer, size, 512)
        t_pruned, t_unpruned, t_backbone, outputs = _alternate(encoder, pruner, batches, other=lambda b: bert(**b))
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


def checkpoint_speedup(checkpoint: str, glue_dir: str | None = None, examples: int = 256,
                       batch_sizes=LATENCY_BATCH_SIZES) -> list[dict]:
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
    dev = dev_examples(cfg, task, examples, glue_dir)
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


def _interleaved(engines: dict, batches: list[dict], warmup: int = 2) -> tuple[dict[str, list[float]], dict]:
    """Seconds per batch of each engine (name -> ``fn(batch)``), the engines taking turns on
    every batch after ``warmup`` batches, so load on the machine hits all alike; and each
    engine's outputs. ONNX Runtime sessions must not spin (``OnnxModel(spinning=False)``): a
    session's idle threads otherwise busy-wait through the next engine's turn, which on 2 cores
    made the other engines' batch-1 times several times too slow."""
    times = {name: [] for name in engines}
    outputs = {name: [] for name in engines}
    with torch.inference_mode():
        for batch in batches[:warmup]:
            for fn in engines.values():
                fn(batch)
        for batch in batches:
            for name, fn in engines.items():
                start = time.perf_counter()
                result = fn(batch)
                times[name].append(time.perf_counter() - start)
                outputs[name].append(result)
    return times, outputs


def onnx_trained_speedup(described: Described, session, unpruned: PruningModule, glue_dir: str | None = None,
                         examples: int = 64, batch_sizes=(1,)) -> list[dict]:
    """``trained_speedup`` in ONNX Runtime: the checkpoint's graph (``session``, an
    ``export.OnnxModel``) against ``unpruned`` (the same weights with ``KeepAll``) exported now."""
    from tokprune.export import OnnxModel, export_module

    cfg = described.cfg
    dev = dev_examples(cfg, get_task(cfg.task.name), examples, glue_dir)
    tokenizer = described.tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        reference = OnnxModel(export_module(described, unpruned, Path(folder) / "unpruned.onnx").read_bytes(),
                              spinning=False)
    results = []
    for size in batch_sizes:
        batches = _batches(dev, tokenizer, size, cfg.task.max_length)
        times, outputs = _interleaved({"pruned": session, "unpruned": reference}, batches)
        kept = torch.cat([k for _, k in outputs["pruned"]]).double()  # examples x L
        lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).double()
        results.append({
            "ms_per_batch_pruned": 1e3 * statistics.median(times["pruned"]),
            "ms_per_batch_unpruned": 1e3 * statistics.median(times["unpruned"]),
            "wall_speedup": sum(times["unpruned"]) / sum(times["pruned"]),
            "kept_fraction_mean": float((kept / lengths[:, None]).mean()),
            "threads": torch.get_num_threads(),
            "engine": "onnxruntime",
            "examples": len(dev),
            "batch_size": size,
        })
    return results


def _engine_row(name: str, task: str, size: int, dev_rows: int, times: dict, outputs: dict, counter: FlopsCounter,
                max_length: int) -> dict:
    """One line of the engines table from ``_interleaved``'s timings and outputs."""
    torch_outs = outputs["torch_pruned"]
    flops = [counter.batch(out, max_length=max_length) for _, out in torch_outs]
    pruned, real = sum(f.pruned for f in flops), sum(f.unpruned_real for f in flops)
    kept_equal = all(torch.equal(kept, out.kept_counts().T.cpu())
                     for (_, kept), (_, out) in zip(outputs["onnx_pruned"], torch_outs))
    diff = max(float((ort - ref).abs().max()) for (ort, _), (ref, _) in zip(outputs["onnx_pruned"], torch_outs))
    ms = {engine: 1e3 * statistics.median(t) for engine, t in times.items()}
    base = sum(times["transformers"])
    return {
        "config": name, "task": task, "batch_size": size, "examples": dev_rows,
        **{f"ms_per_batch_{engine}": value for engine, value in ms.items()},
        **{f"speedup_{engine}": base / sum(t) for engine, t in times.items() if engine != "transformers"},
        "flops_ratio_real": pruned / real,
        "kept_fraction_mean": float(torch.cat([(out.kept_counts().T / out.lengths[:, None].clamp(min=1)).double()
                                               for _, out in torch_outs]).mean()),
        "onnx_kept_equal_torch": kept_equal,
        "onnx_max_abs_diff": diff,
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)


def _unpruned_engines(bert, example, folder: Path, name: str) -> dict:
    """transformers' forward and its ONNX export: the unpruned references."""
    from tokprune.export import BertGraph, OnnxModel, export_graph

    bert = bert.eval()
    reference = OnnxModel(export_graph(BertGraph(bert), example, folder / f"{_slug(name)}-unpruned.onnx"),
                          spinning=False)
    return {"transformers": lambda b: bert(**b), "onnx_unpruned": reference}


def engines_schedule(cfg: DictConfig, task_name: str, schedule: dict[int, float], folder: Path,
                     batch_sizes=(1, 32), examples: int = 256) -> list[dict]:
    """The engines table's rows for the fixed keep schedule on the backbone of ``cfg``."""
    from tokprune.export import EncoderGraph, OnnxModel, example_inputs, export_graph

    task = get_task(task_name)
    tokenizer = load_tokenizer(cfg.model)
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    pruner = TopKSchedule(schedule)
    counter = FlopsCounter(encoder)
    dev = dev_examples(cfg, task, examples)
    example = example_inputs(tokenizer, len(task.tsv_text) == 2)
    engines = _unpruned_engines(bert, example, folder, f"schedule-{task_name}")
    engines["torch_pruned"] = lambda b: (None, encoder(b["input_ids"], b["attention_mask"], b.get("token_type_ids"),
                                                      pruner=pruner, hard=True, output="cls"))
    engines["onnx_pruned"] = OnnxModel(export_graph(EncoderGraph(encoder, pruner), example,
                                                    folder / f"schedule-{task_name}.onnx"), spinning=False)
    name = "keep schedule " + ", ".join(f"{f:g} from layer {l}" for l, f in sorted(schedule.items()))
    rows = []
    for size in batch_sizes:
        times, outputs = _interleaved(engines, _batches(dev, tokenizer, size, 512))
        outputs["torch_pruned"] = [(out.hidden[:, 0], out) for _, out in outputs["torch_pruned"]]
        rows.append(_engine_row(name, task_name, size, len(dev), times, outputs, counter, 512))
    return rows


def engines_checkpoint(checkpoint: str, label: str, folder: Path, glue_dir: str | None = None,
                       batch_sizes=(1, 32), examples: int = 256) -> list[dict]:
    """The engines table's rows for a trained checkpoint (a method's best Pareto point)."""
    from tokprune.export import OnnxModel, example_inputs, export_module

    described, module = rebuild(checkpoint)
    module = module.cpu().eval()
    cfg = described.cfg
    task = get_task(cfg.task.name)
    dev = dev_examples(cfg, task, examples, glue_dir)
    tokenizer = described.tokenizer()
    engines = _unpruned_engines(described.bert(), example_inputs(tokenizer, len(task.tsv_text) == 2), folder, label)
    engines["torch_pruned"] = lambda b: module(b, hard=True)
    engines["onnx_pruned"] = OnnxModel(export_module(described, module, folder / f"{_slug(label)}.onnx"), spinning=False)
    counter = FlopsCounter(module.encoder, module.pruner)
    rows = []
    for size in batch_sizes:
        batches = _batches(dev, tokenizer, size, cfg.task.max_length)
        times, outputs = _interleaved(engines, batches)
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
            skipped.append(f"{method.get('label')}: {'checkpoint missing: ' + checkpoint if checkpoint else 'no best point'}")
    return found, f"{task}: " + ("; ".join(skipped) if skipped else "all methods' best points measured")


def engines(cfg: DictConfig, tasks=("sst2", "mrpc"), schedule: dict[int, float] | None = None, examples: int = 256,
            reports: Path = Path("reports"), batch_sizes=(1, 32)) -> dict:
    """Every row of the engines table: the keep schedule, then each best Pareto point found."""
    from tokprune.export import require

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
    return {"rows": rows, "pareto": notes, "threads": torch.get_num_threads(),
            "engines": {"transformers": "transformers BertModel forward, unpruned (eager attention)",
                        "onnx_unpruned": "that BertModel exported to ONNX, ONNX Runtime CPU, unpruned",
                        "torch_pruned": "tokprune hard mode in torch (packed tokens, fused attention where no "
                                        "pruner reads it)",
                        "onnx_pruned": "tokprune export: decisions and token removal inside the graph, ONNX Runtime"}}


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


STEP_METHODS = ("none", "gate", "transkimmer", "top", "static")


def training_steps(cfg: DictConfig, methods=STEP_METHODS, steps_per_block: int = 8, rounds: int = 3,
                   rows: int = 1024, target_flops: float = 0.45) -> dict:
    """Median training-step time of each method (protocol=shared at ``target_flops``, its cpu sweep's
    settings) against the unpruned baseline's step, on SST-2 at the config's batch size, methods
    taking turns in blocks of steps in one run. The teacher is the pretrained encoder with a fresh
    head saved as a baseline checkpoint (step time does not depend on its weights); its outputs per
    training row are cached first (that one-time cost is reported on its own)."""
    from tokprune.checkpoint import describe
    from tokprune.config import compose

    settings = {"gate": ["method.gate_lr=1e-2", "method.straight_through=true"],
                "transkimmer": ["method.predictor_lr=1e-3"], "top": ["method.reg_lr=0.1"]}
    tokenizer = load_tokenizer(cfg.model)
    common = [f"model={cfg.model.name}", "task=sst2", "budget=cpu", f"seed={cfg.seed}", f"data.train_subset={rows}",
              f"protocol.target_flops={target_flops}"]
    modules, cache_seconds = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        base_cfg = compose(["method=none", *common])
        baseline = build_method(base_cfg, load_bert(cfg.model), get_task("sst2"))
        path = Path(folder) / "baseline.ckpt"
        torch.save({"state_dict": baseline.state_dict(),
                    "tokprune": describe(base_cfg, baseline.encoder.config, tokenizer, None)}, path)
        for method in methods:
            run_cfg = compose([f"method={method}", *common, f"protocol.baseline_checkpoint={path}",
                               *settings.get(method, [])])
            datamodule = build_datamodule(run_cfg, tokenizer)
            datamodule.setup("fit")
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            module = build_method(run_cfg, load_bert(cfg.model), get_task("sst2"))
            cache_seconds[method] = _time(lambda: module.prepare_fit(datamodule))
            counting = TokenPruningCallback(run_cfg.task.max_length)
            counting.counter = FlopsCounter(module.encoder, module.pruner)
            counting.counter.per_layer(torch.arange(1, run_cfg.task.max_length + 1)[None])  # traced before timing
            modules[method] = (module, datamodule, counting)
        timings: dict[str, list[float]] = {method: [] for method in methods}
        for _ in range(rounds):
            for method, (module, datamodule, counting) in modules.items():
                timer = _StepTimer()
                trainer = L.Trainer(max_steps=steps_per_block, limit_val_batches=0, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                    callbacks=[counting, timer],
                                    gradient_clip_val=cfg.train.gradient_clip_val)
                trainer.fit(module, datamodule=datamodule)
                timings[method].extend(timer.times[1:])  # the first step of a block pays loader start-up
    base = statistics.median(timings["none"])
    return {
        "task": "sst2", "batch_size": cfg.train.batch_size, "protocol": "shared", "target_flops": target_flops,
        "steps_timed_per_method": len(timings["none"]),
        "rows": [{"method": method, "median_step_ms": 1e3 * statistics.median(times),
                  "ratio_to_baseline": statistics.median(times) / base,
                  "one_time_prepare_seconds": cache_seconds[method]} for method, times in timings.items()],
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


ENGINES = ("transformers", "onnx_unpruned", "torch_pruned", "onnx_pruned")
ENGINE_LABELS = {"transformers": "transformers, unpruned", "onnx_unpruned": "ONNX Runtime, unpruned",
                 "torch_pruned": "tokprune torch hard mode, pruned", "onnx_pruned": "ONNX Runtime, pruned"}


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
            ax.bar([j + (i - 1.5) * width for j in x], [r[f"ms_per_batch_{engine}"] for r in chosen], width,
                   label=ENGINE_LABELS[engine])
        ax.set_xticks(list(x), [f"{r['task']}\n{r['config']}\nFLOPs ratio {r['flops_ratio_real']:.2f}"
                                for r in chosen], fontsize=7)
        ax.set_ylabel("median ms per batch")
        ax.set_title(f"batch {size} ({chosen[0]['examples']} dev rows, {table['threads']} threads)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("speedup", "layers", "callback", "engines", "steps")


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
        results["engines"] = engines(cfg, tasks, schedule, examples, reports)
    if "steps" in only:
        results["training_steps"] = training_steps(cfg, steps_per_block=steps_per_block, rounds=rounds)
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    if all(key in results for key in ("speedup", "layer_latency_batch1", "callback_overhead")):
        plot(results, out_dir / "bench.png")
    if "engines" in results:
        plot_engines(results["engines"], out_dir / "engines.png")
    return results


def engines_summary(table: dict) -> list[str]:
    head = (f"{'task':5s} {'batch':>5s}  {'transformers':>12s} {'ORT unpruned':>12s} {'torch pruned':>12s} "
            f"{'ORT pruned':>12s}  {'FLOPs':>5s}  kept=  config")
    lines = [f"engines: median ms per batch (x speedup vs transformers unpruned), {table['threads']} threads", head]
    for r in table["rows"]:
        cells = [f"{r['ms_per_batch_transformers']:12.2f}"] + [
            f"{r[f'ms_per_batch_{e}']:6.2f} x{r[f'speedup_{e}']:4.2f}" for e in ENGINES[1:]]
        lines.append(f"{r['task']:5s} {r['batch_size']:5d}  {' '.join(cells)}  {r['flops_ratio_real']:5.3f}  "
                     f"{'yes' if r['onnx_kept_equal_torch'] else 'NO ':4s} {r['config']}")
    lines += [f"pareto points: {note}" for note in table["pareto"]]
    return lines


def summary(results: dict) -> str:
    lines = []
    for r in results.get("speedup", []):
        lines.append(
            f"{r['task']:5s} batch {r['batch_size']:2d}: FLOPs x{r['flops_reduction']:.2f} fewer, wall x{r['wall_speedup']:.2f} "
            f"faster ({r['ms_per_batch_unpruned']:.1f} -> {r['ms_per_batch_pruned']:.1f} ms/batch), "
            f"speedup/FLOPs-reduction {r['speedup_over_flops_reduction']:.2f}"
        )
    if "layer_latency_batch1" in results:
        lat = " ".join(f"{r['length']}:{r['ms']:.2f}ms/{r['flops_fraction_of_longest']:.3f}F"
                       for r in results["layer_latency_batch1"])
        lines.append(f"one layer at batch 1, tokens:latency/FLOPs-fraction: {lat}")
    if "callback_overhead" in results:
        o = results["callback_overhead"]
        lines.append(
            f"callback overhead: {o['median_step_ms_callback_on']:.0f} vs {o['median_step_ms_callback_off']:.0f} ms/step "
            f"= x{o['ratio_on_over_off']:.3f}; one-time tracing of {o['lengths_traced']} lengths "
            f"{o['one_time_trace_seconds_all_lengths']:.1f} s"
        )
    if "engines" in results:
        lines += engines_summary(results["engines"])
    if "training_steps" in results:
        t = results["training_steps"]
        lines.append(f"training step, {t['task']} batch {t['batch_size']}, protocol={t['protocol']} target "
                     f"{t['target_flops']} (ms, x the baseline's): " + ", ".join(
                         f"{r['method']} {r['median_step_ms']:.0f} (x{r['ratio_to_baseline']:.2f})" for r in t["rows"]))
    return "\n".join(lines)
