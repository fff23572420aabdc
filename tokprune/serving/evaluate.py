"""``python -m tokprune eval checkpoint=PATH``: what a trained checkpoint does on its dev set.

A checkpoint describes itself (``tokprune.methods.checkpoint``), so its task, backbone, dev subset
and batch size come from the file; an evaluation may change only where the data and the
MLflow store are, how many dev rows and how big a batch. The dev set goes through the same
Lightning validation loop and token-pruning callback as in training, in hard mode (pruned
tokens really removed), so with nothing changed the metrics are the training run's own.
CPU latency of the model's pruner against the unpruned encoder on the same weights is
bench.py's measurement.

``engine=onnx`` (an argument of the command, not a config key) runs the same validation on the
model exported to ONNX (``tokprune.serving.export``: decisions and token removal inside the graph) in
ONNX Runtime: ``<checkpoint>.onnx`` when it is newer than the checkpoint, else an export made on
the fly. The graph reports kept counts per layer, which is all the FLOPs callback reads, so the
metrics, FLOPs and kept fractions are those of torch's hard mode; the latency is then ONNX
Runtime's, the pruned graph against the same weights exported with nothing pruned.

``eval.computation`` says which computation runs the dev set: ``hard`` (default: the tokens really
removed, what a deployed model does), ``soft`` (the training computation, the method's soft rule,
with the evaluation's decisions: for a hard-equivalent rule it equals ``hard``) or ``training``
(the training computation with the training's decisions: masks sampled, seeded with the stored
seed; gates as training uses them; dropout off). Comparing the three measures a method's
train/eval gap on its own checkpoint. In the soft computations every token is computed; the
FLOPs and kept fractions printed then count the tokens whose mask is > 0.5, as hard mode would
(for continuous masks, e.g. ToP's sampled ones, a proxy). The latency is always hard mode's.

The result is logged as an ``eval`` run beside its training run when the MLflow store is
there. MLflow is never required: a missing or failing store costs one printed line.
"""

from __future__ import annotations

import copy
import math
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from tokprune.config.checks import Rule, check_config
from tokprune.core.data import get_task
from tokprune.core.encoder import EncoderOutput
from tokprune.core.liveness import owner
from tokprune.errors import UsageError
from tokprune.methods import rebuild
from tokprune.serving.latency import LATENCY_BATCH_SIZES, onnx_trained_speedup, trained_speedup
from tokprune.serving.predict import check_engine
from tokprune.training.callbacks import TokenPruningCallback
from tokprune.training.tracking import (
    artifact_root,
    reap_dead_runs,
    resolve_tracking_uri,
    run_name,
    run_tags,
    store_dir,
)
from tokprune.training.train import build_datamodule

#: Stored settings an evaluation may change; the checkpoint fixes every other one.
CHANGEABLE = ("data.glue_dir", "data.eval_subset", "data.num_workers", "train.eval_batch_size", "mlflow.tracking_uri")
#: Taken as typed, never parsed as YAML: paths and URIs.
TEXT = ("data.glue_dir", "mlflow.tracking_uri")
#: Where the environment overrides the stored value, as it does for a new run (conf/defaults.yaml).
ENVIRONMENT = {"data.glue_dir": "GLUE_DIR", "mlflow.tracking_uri": "MLFLOW_TRACKING_URI"}
#: The evaluation's own settings: default and rule.
OWN = {
    "eval.latency_examples": (256, Rule("int", low=0)),
    "eval.computation": ("hard", Rule("str", choices=("hard", "soft", "training"))),
}
COMPUTATIONS = {
    "hard": "hard mode",
    "soft": "soft computation with the evaluation's decisions",
    "training": "training computation and decisions",
}


@dataclass
class Evaluation:
    checkpoint: Path
    cfg: DictConfig  # the stored config with this evaluation's changes
    training_run_id: str | None
    selected: dict  # the training validation the checkpoint holds: rule, epoch, step, metrics
    rows: int
    metrics: dict[str, float]  # eval/<metric>, eval/loss, eval/flops_ratio_*, eval/kept_fraction/layer_<l>, ...
    latency: list[dict]  # bench.trained_speedup rows, one per batch size; empty when skipped
    latency_examples: int
    mlflow: str = ""  # the line saying where it was logged, or why not
    engine: str = "torch"  # torch (hard mode) or onnx (ONNX Runtime)
    computation: str = "hard"  # hard, soft (training's rule, evaluation's decisions) or training (its decisions too)
    engine_source: str = ""  # onnx: "reused <file>" or "exported on the fly"
    quantize: str = ""  # onnx: "int8" for the dynamically quantised graph

    @property
    def kept_fractions(self) -> list[float]:
        layers = sorted(int(k.rsplit("_", 1)[1]) for k in self.metrics if k.startswith("eval/kept_fraction/layer_"))
        return [self.metrics[f"eval/kept_fraction/layer_{layer}"] for layer in layers]


def parse_settings(words: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """(changes to the stored config, the evaluation's own settings), checked like train's."""
    changes, own = {}, {key: default for key, (default, _) in OWN.items()}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise UsageError(f"bad argument '{word}': expected key=value, e.g. data.eval_subset=500")
        if key not in CHANGEABLE and key not in OWN:
            raise UsageError(
                f"eval cannot set '{key}' (the checkpoint fixes it): it takes {', '.join([*CHANGEABLE, *OWN])}"
            )
        value = raw if key in TEXT else _yaml(raw)
        if key in OWN:
            rule = OWN[key][1]
            if not rule.accepts(value):
                raise UsageError(f"bad value for {key}: '{raw}' (expected {rule.describe()})")
            own[key] = value
        else:
            changes[key] = value
    checked = OmegaConf.create()
    for key, value in changes.items():
        OmegaConf.update(checked, key, value)
    check_config(checked)  # types and ranges of the changed keys, as for a new run
    return {key: OmegaConf.select(checked, key) for key in changes}, own


def _yaml(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def eval_config(stored: DictConfig, changes: dict[str, object]) -> DictConfig:
    cfg = stored.copy()
    for key, variable in ENVIRONMENT.items():
        if variable in os.environ:
            OmegaConf.update(cfg, key, os.environ[variable])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def onnx_forward(session, module):
    """A ``PruningModule.forward`` that runs ``session`` (an ``export.OnnxModel``): logits, and an
    ``EncoderOutput`` holding the graph's kept counts (no states: ``hidden`` is B x 0 x 0)."""

    def forward(batch: dict, hard: bool | None = None):
        logits, kept = session(batch)
        padding = batch["attention_mask"].to(logits.dtype)
        empty = logits.new_zeros(logits.shape[0], 0, 0)
        return logits, EncoderOutput(empty, [], [], padding, hard=True, counts=kept.T)

    return forward


def computed_forward(module, computation: str):
    """A ``PruningModule.forward`` that runs ``computation``: ``soft`` (the method's soft rule with
    the evaluation's decisions) or ``training`` (the pruner in training mode: its training
    decisions, sampled where they are sampled; the rest of the model stays in eval mode)."""
    forward = module.forward

    def run(batch: dict, hard: bool | None = None):
        module.pruner.train(computation == "training")
        try:
            return forward(batch, hard=False)
        finally:
            module.pruner.eval()

    return run


def evaluate(
    checkpoint: str | Path, words: list[str] = (), engine: str = "torch", quantize: str | None = None
) -> Evaluation:
    """Rebuild ``checkpoint``, run its task's dev set in hard mode (torch, or ONNX Runtime with
    ``engine="onnx"``) or in the computation ``eval.computation`` names, time it (hard mode),
    log it if possible."""
    check_engine(engine, quantize)
    changes, own = parse_settings(list(words))
    computation = own["eval.computation"]
    if engine == "onnx" and computation != "hard":
        raise UsageError(f"eval.computation={computation} runs in torch: the ONNX graph computes hard mode only")
    described, module = rebuild(checkpoint)
    cfg = eval_config(described.cfg, changes)
    # The data module reads both splits; one train row is all an evaluation needs to tokenise.
    datamodule = build_datamodule(OmegaConf.merge(cfg, {"data": {"train_subset": 1}}), described.tokenizer())
    session, validated_module = None, module
    if engine == "onnx":
        from tokprune.serving.export import session_for

        # timed taking turns with another session, so it must not spin
        session = session_for(described, module, spinning=False, quantize=quantize)
        validated_module = copy.copy(module)  # the same weights, its forward run by ONNX Runtime
        validated_module.forward = onnx_forward(session, module)
    elif computation != "hard":
        validated_module = copy.copy(module)
        validated_module.forward = computed_forward(module, computation)
    trainer = L.Trainer(
        accelerator="cpu" if engine == "onnx" else "auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TokenPruningCallback(cfg.task.max_length)],
    )
    L.seed_everything(int(cfg.seed), verbose=False)  # the training computation samples its decisions
    [validated] = trainer.validate(validated_module, datamodule=datamodule, verbose=False)
    examples = own["eval.latency_examples"]
    module = module.cpu().eval()
    if not examples:
        latency = []
    elif engine == "onnx":
        latency = onnx_trained_speedup(described, session, module, cfg.data.glue_dir, examples, LATENCY_BATCH_SIZES)
    else:
        latency = trained_speedup(described, module, cfg.data.glue_dir, examples, LATENCY_BATCH_SIZES)
    result = Evaluation(
        checkpoint=Path(checkpoint).resolve(),
        cfg=cfg,
        training_run_id=described.run_id,
        selected=described.contents["tokprune"]["selected"],
        rows=datamodule.size("dev"),
        metrics={name.replace("val/", "eval/", 1): float(value) for name, value in validated.items()},
        latency=latency,
        latency_examples=examples,
        engine=engine,
        engine_source=session.source if session is not None else "",
        computation=computation,
        quantize=quantize or "",
    )
    result.mlflow = log_evaluation(result)
    return result


def _unreachable(uri: str) -> str | None:
    """Why ``uri`` cannot take the run, checked first so that a missing SQLite store is not
    created empty and a dead server is not retried for minutes; None when it may."""
    if store_dir(uri) is not None:
        path = Path(uri[len("sqlite:///") :])
        return None if path.is_file() else f"no MLflow store at {path}; give one with mlflow.tracking_uri="
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except OSError as exc:
            return f"tracking server {uri} does not answer ({exc})"
    return None


def _mlflow_metrics(result: Evaluation) -> dict[str, float]:
    metrics = dict(result.metrics) | {"eval/rows": float(result.rows)}
    main = result.metrics.get(f"eval/{get_task(result.cfg.task.name).main_metric}")
    if main is not None:  # the runs table's common columns, as a training run's
        metrics |= {"best/main": main, "best/flops_ratio_real": result.metrics.get("eval/flops_ratio_real", math.nan)}
    for row in result.latency:
        prefix = f"eval/cpu_batch_{row['batch_size']}"
        metrics |= {
            f"{prefix}/ms_per_batch_pruned": row["ms_per_batch_pruned"],
            f"{prefix}/ms_per_batch_unpruned": row["ms_per_batch_unpruned"],
            f"{prefix}/wall_speedup": row["wall_speedup"],
        }
    return metrics


def log_evaluation(result: Evaluation) -> str:
    """Log ``result`` as an ``eval`` run in the stored config's experiment; the line to print."""
    cfg = result.cfg
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    why = _unreachable(uri)
    if why:
        return f"MLflow: not logged ({why})"
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_root(uri))
        )
        reap_dead_runs(client, experiment_id, float(cfg.mlflow.get("stale_hours", 48)))
        tags = {
            **run_tags(cfg, "eval"),
            "training_run_id": result.training_run_id or "",
            "checkpoint": str(result.checkpoint),
            "engine": result.engine,
            "computation": result.computation,
            "quantize": result.quantize or "none",
            **owner(),
        }
        suffix = "" if result.computation == "hard" else f"-{result.computation}"
        run_id = client.create_run(experiment_id, run_name=f"eval-{run_name(cfg)}{suffix}", tags=tags).info.run_id
        try:
            now = int(time.time() * 1000)
            settings = {key: OmegaConf.select(cfg, key) for key in CHANGEABLE if key != "mlflow.tracking_uri"}
            params = settings | {
                "eval.latency_examples": result.latency_examples,
                "engine": result.engine,
                "eval.computation": result.computation,
            }
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, now, 0) for k, v in _mlflow_metrics(result).items()],
                params=[Param(k, str(v)) for k, v in params.items()],
            )
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
    except Exception as exc:  # MLflow is never required: say why and go on
        return f"MLflow: not logged ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]})"
    return f"MLflow: eval run {run_id} in experiment '{cfg.mlflow.experiment}' at {uri}"


def summary(result: Evaluation) -> str:
    cfg, m = result.cfg, result.metrics
    selected = result.selected
    int8 = " int8" if result.quantize else ""
    engine = f", ONNX Runtime{int8}: {result.engine_source}" if result.engine == "onnx" else ""
    metrics = "  ".join(f"{name}={m[f'eval/{name}']:.4f}" for name in get_task(cfg.task.name).metrics)
    lines = [
        f"checkpoint {result.checkpoint}",
        f"  {cfg.method.name} {cfg.task.name} {cfg.model.name} {cfg.budget.name}, training run "
        f"{result.training_run_id}, validation of epoch {selected['epoch']} step {selected['step']} "
        f"(rule {selected['rule']})",
        f"dev ({result.rows} rows, {COMPUTATIONS[result.computation]}{engine}): {metrics}",
        f"FLOPs (fvcore, 1 MAC = 1 FLOP): ratio {m['eval/flops_ratio_real']:.3f} vs unpruned at real length, "
        f"{m['eval/flops_ratio_padded']:.3f} vs padded to {cfg.task.max_length}",
        f"kept fraction per layer: {' '.join(f'{f:.2f}' for f in result.kept_fractions)}",
    ]
    if result.computation != "hard":
        lines.append("  (soft computation: every token computed; FLOPs and kept fractions count masks > 0.5)")
    if result.latency:
        timed = "; ".join(
            f"batch {r['batch_size']}: {r['ms_per_batch_pruned']:.1f} vs "
            f"{r['ms_per_batch_unpruned']:.1f} ms = x{r['wall_speedup']:.2f}"
            for r in result.latency
        )
        what = (
            f"ONNX Runtime, pruned{int8} vs unpruned float32 graph"
            if result.engine == "onnx"
            else "pruned vs unpruned encoder"
        )
        lines.append(
            f"CPU latency, {what}, same weights ({result.latency[0]['examples']} dev rows, "
            f"{result.latency[0]['threads']} threads): {timed}"
        )
    else:
        lines.append("CPU latency: skipped (eval.latency_examples=0)")
    lines.append(result.mlflow)
    return "\n".join(lines)
