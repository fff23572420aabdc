"""Collect a task's sweep studies: find them in the Optuna storage, read their trials, fronts and
baselines (and MLflow runs), join the studies an earlier report recorded, pick each method's
operating points and time them."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.trial import TrialState

from tokprune.errors import UsageError
from tokprune.search.plan import storage_label, study_storage
from tokprune.search.results import MethodResult, Point, higher_metric, portable, recorded_studies
from tokprune.training.tracking import resolve_tracking_uri, store_dir

#: The operating points read off each method's front, and how the tables name them.
ROLES = ("best", "within_flops", "near_baseline")


REFERENCE_METHOD = "static"  # the front every learned method is compared with at equal FLOPs


def operating_points(result: MethodResult, flops_budget: float, tolerance: float) -> dict[str, int | None]:
    """The trials a reader compares methods by: the best point on the front; the best at FLOPs
    ratio (real length) <= ``flops_budget``; the fewest FLOPs within ``tolerance`` (absolute, in
    the metric's 0..1 units) of the baseline's metric."""
    front = result.front
    base = result.baseline_metric
    within = [p for p in front if p.flops_real <= flops_budget]
    near = [p for p in front if math.isfinite(base) and p.metric >= base - tolerance - 1e-12]
    chosen = {
        "best": result.best,
        "within_flops": max(within, key=higher_metric, default=None),
        "near_baseline": min(near, key=lambda p: (p.flops_real, -p.metric), default=None),
    }
    return {role: (p.trial if p else None) for role, p in chosen.items()}


def locate(cfg: DictConfig) -> tuple[str, str, Path]:
    """(tracking URI, Optuna storage, report folder), resolved as the sweep resolves them."""
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    storage = study_storage(str(cfg.sweep.storage or ""), uri)
    folder = Path(cfg.report.dir) if cfg.report.dir else (store_dir(uri) or Path()) / "reports"
    return uri, storage, folder.resolve() / cfg.task.name


def _open(storage: str):
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(storage))


def find_studies(cfg: DictConfig, storage: str, allow_none: bool = False) -> list[optuna.Study]:
    """The sweep studies of this task, model, budget and seed; a one-line error when there are
    none, unless ``allow_none``."""
    task, model, budget, seed = cfg.task.name, cfg.model.name, cfg.budget.name, cfg.seed
    summaries = []
    if "://" in storage or Path(storage).is_file():  # never create a journal just to look
        try:
            summaries = optuna.get_all_study_summaries(_open(storage), include_best_trial=False)
        except Exception as exc:
            raise UsageError(f"storage {storage_label(storage)}: cannot read it ({type(exc).__name__})") from None
    sweeps = [s for s in summaries if s.user_attrs.get("task") == task and "method" in s.user_attrs]
    mine = [
        s
        for s in sweeps
        if (s.user_attrs.get("model"), s.user_attrs.get("budget"), s.user_attrs.get("seed")) == (model, budget, seed)
    ]
    if not mine and not allow_none:
        others = sorted(
            {
                f"model={s.user_attrs.get('model')} budget={s.user_attrs.get('budget')} seed={s.user_attrs.get('seed')}"
                for s in sweeps
            }
        )
        hint = f" (it has studies of {task} for {'; '.join(others)})" if others else ""
        raise UsageError(
            f"no sweep study of task {task} for model={model} budget={budget} seed={seed} in "
            f"{storage_label(storage)}{hint}: run `make sweep METHOD=<method> TASK={task} "
            f"MODEL={model} BUDGET={budget} SEED={seed}` first"
        )
    if not mine:
        return []
    opened = _open(storage)
    return [
        optuna.load_study(study_name=s.study_name, storage=opened)
        for s in sorted(mine, key=lambda s: (s.user_attrs["method"], s.study_name))
    ]


def _kept(values: dict, prefix: str) -> list[float]:
    layers = sorted(int(k[len(prefix) :]) for k in values if k.startswith(prefix) and k[len(prefix) :].isdigit())
    return [float(values[f"{prefix}{layer}"]) for layer in layers]


def _baseline(client: MlflowClient, parent, main_metric: str) -> dict | None:
    run_id = parent.data.tags.get("baseline_run_id") if parent else None
    if not run_id:
        return None
    try:
        metrics = client.get_run(run_id).data.metrics
    except Exception:
        metrics = {}
    metric = metrics.get(f"best/{main_metric}", parent.data.metrics.get(f"baseline/{main_metric}", math.nan))
    return {
        "run_id": run_id,
        "metric": metric,
        "flops_real": metrics.get("best/flops_ratio_real", 1.0),
        "flops_padded": metrics.get("best/flops_ratio_padded"),
        "kept": _kept(metrics, "best/kept_fraction/layer_"),
        "checkpoint": portable(parent.data.tags.get("baseline_checkpoint", "")),
    }


def collect(studies: list[optuna.Study], client: MlflowClient, main_metric: str) -> list[MethodResult]:
    """Each study's complete trials, front and baseline, labelled later (``relabel``)."""
    results = []
    for study in studies:
        method = study.user_attrs["method"]
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        front = {t.number for t in study.best_trials} if complete else set()
        repeats = study.user_attrs.get("repeats", {})  # tokprune.search.repeat's records
        points = [
            Point(
                trial=t.number,
                params=dict(t.params),
                metric=t.values[0],
                flops_real=t.values[1],
                flops_padded=t.user_attrs.get("best/flops_ratio_padded"),
                kept=_kept(t.user_attrs, "best/kept_fraction/layer_"),
                run_id=t.user_attrs.get("mlflow_run_id"),
                pareto=t.number in front,
                # committed reports carry no machine path: a repeat's checkpoint as its last parts
                repeats=[
                    {**r, "checkpoint": portable(r.get("checkpoint") or "")} for r in repeats.get(str(t.number), [])
                ],
            )
            for t in complete
        ]
        parent_id = study.user_attrs.get("mlflow_parent_run_id")
        try:
            parent = client.get_run(parent_id) if parent_id else None
        except Exception:  # the study names a run this store does not hold
            parent, parent_id = None, None
        resumed = [t for t in complete if t.user_attrs.get("resumed_from")]
        results.append(
            MethodResult(
                method=method,
                label=method,
                study=study.study_name,
                parent_run_id=parent_id,
                overrides=list(study.user_attrs.get("overrides", [])),
                points=points,
                baseline=_baseline(client, parent, main_metric),
                speedup={t.number: t.user_attrs["speedup"] for t in resumed if t.user_attrs.get("speedup")},
                resumed_from=", ".join(sorted({t.user_attrs["resumed_from"] for t in resumed})),
                resumed_trials=[t.number for t in resumed],
                # the sweep's parent run says (its tags); a parent from before protocols: paper
                protocol=(parent.data.tags.get("protocol") if parent else None) or "paper",
            )
        )
    return results


def carried(cfg: DictConfig, present: set[str]) -> list[MethodResult]:
    """The studies recorded in ``report.carry`` (a report.json) that ``present`` (the study names
    this storage holds) lacks, as recorded there."""
    path = str(cfg.report.carry or "")
    if not path:
        return []
    return [r for r in recorded_studies(path, cfg, "report.carry") if r.study not in present]


def relabel(results: list[MethodResult]) -> list[MethodResult]:
    """Ordered by method then study. A method's name labels it if it has one study; with one
    study per protocol, ``method (protocol=...)``; with several, ``method (protocol=..., <the
    sweep's own overrides>)`` (``top (protocol=shared, protocol.hard_phase=0.2)``) where that tells
    them apart; else the study's name."""
    results = sorted(results, key=lambda r: (r.method, r.protocol != "shared", r.overrides, r.study))
    methods = [r.method for r in results]
    pairs = [(r.method, r.protocol) for r in results]
    settings = [(r.method, r.protocol, tuple(r.overrides)) for r in results]
    for r, setting in zip(results, settings):
        if methods.count(r.method) == 1:
            r.label = r.method
        elif pairs.count((r.method, r.protocol)) == 1:
            r.label = f"{r.method} (protocol={r.protocol})"
        elif settings.count(setting) == 1:
            r.label = f"{r.method} ({', '.join([f'protocol={r.protocol}', *r.overrides])})"
        else:
            r.label = r.study
    return results


def _checkpoint(client: MlflowClient, run_id: str, uri: str) -> Path | None:
    """The trial's best checkpoint: ``<train.checkpoint_dir>/<run id>/best.ckpt`` (train.py)."""
    try:
        run = client.get_run(run_id)
    except Exception:  # the run is not in this store
        return None
    if run.data.tags.get("checkpoint"):
        return Path(run.data.tags["checkpoint"])
    folder = run.data.params.get("train.checkpoint_dir")
    if not folder:
        return None
    path = Path(folder) / run_id / "best.ckpt"
    if not path.is_absolute() and not path.is_file() and uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :]).parent / path  # relative to the project that ran it
    return path


def batch_sizes() -> tuple[int, ...]:
    """The batch sizes speedups are timed and tabled at (``eval``'s)."""
    from tokprune.serving.latency import LATENCY_BATCH_SIZES  # loads torch: only once a report is measured or written

    return LATENCY_BATCH_SIZES


def _why(exc: Exception) -> str:
    """An exception as one line for a report cell."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def measure_speedup(cfg: DictConfig, point: Point, client: MlflowClient, uri: str) -> dict:
    """Hard-mode CPU speedup of one point vs KeepAll at each of ``batch_sizes()``, in torch
    (``{"batch_1": bench row, ...}``) and in ONNX Runtime (``"onnx_batch_1"``, ..., exported pruned
    vs exported unpruned; or ``"onnx_skipped": why``), or ``{"skipped": why}``."""
    from tokprune.serving.latency import checkpoint_onnx_speedup, checkpoint_speedup  # loads torch: only when timed

    examples = int(cfg.report.speedup_examples)
    if examples <= 0:
        return {"skipped": "report.speedup_examples=0"}
    if not point.run_id:
        return {"skipped": "no MLflow run"}
    path = _checkpoint(client, point.run_id, uri)
    if path is None or not path.is_file():
        where = portable(str(path)) if path else "not recorded"  # no machine path in a committed report
        kept = "a sweep deletes its dominated trials' unless sweep.keep_checkpoints=all"
        return {"skipped": f"checkpoint missing ({where}; {kept})"}
    try:
        timed = checkpoint_speedup(str(path), cfg.data.glue_dir, examples, batch_sizes())
    except Exception as exc:  # one method's checkpoint must not stop the report: say why in its cell
        return {"skipped": _why(exc)}
    try:  # what a deployer runs: the exported graph against the exported unpruned one
        deployed = {
            f"onnx_batch_{row['batch_size']}": row
            for row in checkpoint_onnx_speedup(str(path), cfg.data.glue_dir, examples, batch_sizes())
        }
    except Exception as exc:
        deployed = {"onnx_skipped": _why(exc)}
    return {"checkpoint": portable(str(path)), **{f"batch_{row['batch_size']}": row for row in timed}, **deployed}
