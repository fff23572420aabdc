"""``python -m tokprune report task=...``: what the sweeps of one task found, on disk and in MLflow.

Reads every sweep study of the task (for the chosen model, budget and seed) from the Optuna
storage (the journal beside the MLflow store unless ``sweep.storage`` says otherwise) and the
MLflow runs the sweeps recorded (parent run, baseline, trial runs), and writes to
``<report.dir>/<task>/``:

- ``pareto_<method>.png``: a method's trials, its Pareto front and the baseline at ratio 1.0;
- ``pareto_all.png``: every method's front on one chart;
- ``kept_<method>.png``: per-layer kept fraction of each Pareto-optimal trial;
- ``pareto.md``: every Pareto point, with a measured hard-mode CPU speedup for each method's
  best point (highest dev metric on its front);
- ``report.html``: all of the above on one self-contained page (inline SVG, hover a point
  for its parameters); ``report.json``: the same numbers for programs.

The same files replace the ``report/`` artifacts of each study's parent run. The sweep calls
this at its end (``after_sweep``), where a failure only warns.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from optuna.trial import TrialState

from tokprune.config import compose
from tokprune.data import get_task
from tokprune.errors import UsageError
from tokprune.sweep_plan import param_strings, storage_label, study_storage
from tokprune.tracking import resolve_tracking_uri, store_dir

ARTIFACT_DIR = "report"
OWNED = ("pareto_*.png", "kept_*.png", "pareto.md", "report.html", "report.json")  # replaced on each run


@dataclass
class Point:
    """One complete trial, as its study recorded it (values of its best epoch)."""

    trial: int
    params: dict
    metric: float
    flops_real: float
    flops_padded: float | None
    kept: list[float]
    run_id: str | None
    pareto: bool


@dataclass
class MethodResult:
    """One study: a method's points, its baseline, and the speedup of its best point."""

    method: str
    label: str  # the method's name, or the study's when a method has several studies
    study: str
    parent_run_id: str | None
    overrides: list[str]
    points: list[Point]
    baseline: dict | None
    speedup: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label)

    @property
    def front(self) -> list[Point]:
        return sorted((p for p in self.points if p.pareto), key=lambda p: (p.flops_real, -p.metric))

    @property
    def best(self) -> Point | None:
        """The Pareto point with the highest dev metric (fewest FLOPs among ties)."""
        return max(self.front, key=lambda p: (p.metric, -p.flops_real), default=None)


# -- where the studies are ------------------------------------------------------------------


def portable(where: str) -> str:
    """A local path or SQLite URI without the machine's folders (committed reports carry no
    absolute path): its last two components; server URLs as they are."""
    prefix = "sqlite:///"
    if where.startswith(prefix):
        return prefix + portable(where[len(prefix):])
    path = Path(where)
    return str(Path(*path.parts[-2:])) if "://" not in where and path.is_absolute() else where


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


def find_studies(cfg: DictConfig, storage: str) -> list[optuna.Study]:
    """The sweep studies of this task, model, budget and seed; a one-line error when there are none."""
    task, model, budget, seed = cfg.task.name, cfg.model.name, cfg.budget.name, cfg.seed
    summaries = []
    if "://" in storage or Path(storage).is_file():  # never create a journal just to look
        try:
            summaries = optuna.get_all_study_summaries(_open(storage), include_best_trial=False)
        except Exception as exc:
            raise UsageError(f"storage {storage_label(storage)}: cannot read it ({type(exc).__name__})") from None
    sweeps = [s for s in summaries if s.user_attrs.get("task") == task and "method" in s.user_attrs]
    mine = [s for s in sweeps if (s.user_attrs.get("model"), s.user_attrs.get("budget"), s.user_attrs.get("seed"))
            == (model, budget, seed)]
    if not mine:
        others = sorted({f"model={s.user_attrs.get('model')} budget={s.user_attrs.get('budget')} "
                         f"seed={s.user_attrs.get('seed')}" for s in sweeps})
        hint = f" (it has studies of {task} for {'; '.join(others)})" if others else ""
        raise UsageError(f"no sweep study of task {task} for model={model} budget={budget} seed={seed} in "
                         f"{storage_label(storage)}{hint}: run `make sweep METHOD=<method> TASK={task} "
                         f"MODEL={model} BUDGET={budget} SEED={seed}` first")
    opened = _open(storage)
    return [optuna.load_study(study_name=s.study_name, storage=opened)
            for s in sorted(mine, key=lambda s: (s.user_attrs["method"], s.study_name))]


# -- what they hold -------------------------------------------------------------------------


def _kept(values: dict, prefix: str) -> list[float]:
    layers = sorted(int(k[len(prefix):]) for k in values if k.startswith(prefix) and k[len(prefix):].isdigit())
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
    return {"run_id": run_id, "metric": metric, "flops_real": metrics.get("best/flops_ratio_real", 1.0),
            "flops_padded": metrics.get("best/flops_ratio_padded"),
            "kept": _kept(metrics, "best/kept_fraction/layer_"),
            "checkpoint": portable(parent.data.tags.get("baseline_checkpoint", ""))}


def collect(studies: list[optuna.Study], client: MlflowClient, main_metric: str) -> list[MethodResult]:
    methods = [s.user_attrs["method"] for s in studies]
    results = []
    for study in studies:
        method = study.user_attrs["method"]
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        front = {t.number for t in study.best_trials} if complete else set()
        points = [Point(trial=t.number, params=dict(t.params), metric=t.values[0], flops_real=t.values[1],
                        flops_padded=t.user_attrs.get("best/flops_ratio_padded"),
                        kept=_kept(t.user_attrs, "best/kept_fraction/layer_"),
                        run_id=t.user_attrs.get("mlflow_run_id"), pareto=t.number in front) for t in complete]
        parent_id = study.user_attrs.get("mlflow_parent_run_id")
        try:
            parent = client.get_run(parent_id) if parent_id else None
        except Exception:  # the study names a run this store does not hold
            parent, parent_id = None, None
        results.append(MethodResult(method=method, label=method if methods.count(method) == 1 else study.study_name,
                                    study=study.study_name, parent_run_id=parent_id,
                                    overrides=list(study.user_attrs.get("overrides", [])), points=points,
                                    baseline=_baseline(client, parent, main_metric)))
    return results


# -- measured speedup of each method's best point ------------------------------------------


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
        path = Path(uri[len("sqlite:///"):]).parent / path  # relative to the project that ran it
    return path


def measure_speedup(cfg: DictConfig, result: MethodResult, client: MlflowClient, uri: str) -> dict:
    """Hard-mode CPU speedup of the best point vs KeepAll, or ``{"skipped": why}``."""
    from tokprune.bench import checkpoint_speedup

    best, examples = result.best, int(cfg.report.speedup_examples)
    if examples <= 0:
        return {"skipped": "report.speedup_examples=0"}
    if best is None or not best.run_id:
        return {"skipped": "no Pareto point with an MLflow run"}
    path = _checkpoint(client, best.run_id, uri)
    if path is None or not path.is_file():
        return {"skipped": f"checkpoint missing ({path or 'not recorded'})"}
    try:
        timed = checkpoint_speedup(str(path), cfg.data.glue_dir, examples)[0]
    except Exception as exc:  # one method's checkpoint must not stop the report: say why in its cell
        return {"skipped": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
    return {"trial": best.trial, "checkpoint": portable(str(path)), **timed}


# -- outputs ---------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _speedup_cell(result: MethodResult, point: Point) -> str:
    if point is not result.best:
        return ""
    s = result.speedup
    if "wall_speedup" in s:
        return f"x{s['wall_speedup']:.2f} ({s['examples']} rows)"
    return f"skipped: {s.get('skipped', 'not measured')}"


def table_rows(results: list[MethodResult]) -> list[list[str]]:
    """Baseline(s) first, then each method's Pareto points by FLOPs; the best point marked."""
    rows, seen = [], set()
    for r in results:
        b = r.baseline
        if b and b["run_id"] not in seen:
            seen.add(b["run_id"])
            rows.append(["none (baseline)", "—", f"run {b['run_id'][:8]}", _fmt(b["metric"]),
                         _fmt(b["flops_real"]), _fmt(b["flops_padded"]), "—"])
    for r in results:
        for p in r.front:
            trial = f"{p.trial} (best)" if p is r.best else str(p.trial)
            rows.append([r.label, trial, " ".join(param_strings(p.params)), _fmt(p.metric), _fmt(p.flops_real),
                         _fmt(p.flops_padded), _speedup_cell(r, p)])
    return rows


def header(metric: str, max_length: int, examples: int) -> list[str]:
    return ["method", "trial", "parameters", f"dev {metric}", "FLOPs ratio (real length)",
            f"FLOPs ratio (padded to {max_length})", f"CPU speedup, hard mode, batch 1 ({examples} dev rows)"]


def conventions(metric: str, max_length: int) -> str:
    return (f"FLOPs are counted by fvcore (1 multiply-add = 1 FLOP), relative to the unpruned encoder on the same "
            f"dev examples at their real length (\"real\") and padded to task.max_length={max_length} (\"padded\"). "
            f"Dev {metric} and FLOPs are those of each trial's best epoch. Speedup: wall time of the unpruned "
            f"encoder (KeepAll) / the method's own pruner, hard mode (tokens removed), CPU, batch 1, on seeded "
            f"real dev rows, for each method's best point (highest dev {metric} on its front).")


def write(cfg: DictConfig, results: list[MethodResult], out: Path, storage: str, uri: str) -> list[Path]:
    from tokprune import report_plots as plots

    task, max_length = cfg.task.name, cfg.task.max_length
    metric = get_task(task).main_metric
    out.mkdir(parents=True, exist_ok=True)
    for pattern in OWNED:
        for old in out.glob(pattern):
            old.unlink()
    sections = []
    for index, r in enumerate(results):
        front = plots.method_front(r, task, metric, max_length, index, out / f"pareto_{r.slug}.png")
        kept = plots.kept_profile(r, task, metric, max_length, index, out / f"kept_{r.slug}.png")
        sections.append((f"{r.label} (study {r.study})", front, kept))
    overlay_svg = plots.overlay(results, task, metric, max_length, out / "pareto_all.png")
    title = f"tokprune report: {task} (model={cfg.model.name}, budget={cfg.budget.name}, seed={cfg.seed})"
    head, rows = header(metric, max_length, int(cfg.report.speedup_examples)), table_rows(results)
    note = conventions(metric, max_length)
    (out / "pareto.md").write_text(plots.markdown(title, head, rows, note))
    meta = (f"Studies: {', '.join(r.study for r in results)} in {portable(storage_label(storage))}; "
            f"MLflow store {portable(uri)}. "
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    (out / "report.html").write_text(plots.page(title, meta, note, head, rows, overlay_svg, sections))
    data = {"task": task, "model": cfg.model.name, "budget": cfg.budget.name, "seed": cfg.seed, "metric": metric,
            "max_length": max_length, "flops_convention": plots.CONVENTION, "storage": portable(storage_label(storage)),
            "tracking_uri": portable(uri), "methods": [asdict(r) for r in results]}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return sorted(p for pattern in OWNED for p in out.glob(pattern))


def log_to_mlflow(client: MlflowClient, results: list[MethodResult], files: list[Path]) -> list[str]:
    """Replace the ``report/`` artifacts of each study's parent run with these files."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    logged = []
    for run_id in dict.fromkeys(r.parent_run_id for r in results if r.parent_run_id):
        try:
            get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(ARTIFACT_DIR)
        except Exception:  # nothing there yet, or a store that cannot delete: files are overwritten anyway
            pass
        for path in files:
            client.log_artifact(run_id, str(path), ARTIFACT_DIR)
        logged.append(run_id)
    return logged


def build_report(cfg: DictConfig) -> tuple[list[Path], list[MethodResult], list[str]]:
    """Read, measure, write, log: (the files written, what they show, parent runs logged to)."""
    uri, storage, out = locate(cfg)
    studies = find_studies(cfg, storage)
    client = MlflowClient(uri)
    results = collect(studies, client, get_task(cfg.task.name).main_metric)
    for r in results:
        r.speedup = measure_speedup(cfg, r, client, uri)
    files = write(cfg, results, out, storage, uri)
    return files, results, log_to_mlflow(client, results, files)


def run_report(args: list[str]) -> int:
    """The ``report`` command."""
    cfg = compose(args)
    files, results, logged = build_report(cfg)
    out = files[0].parent
    print((out / "pareto.md").read_text().split("\n", 4)[-1].strip())
    print(f"wrote {out}/report.html (+ {len(files) - 1} files); logged them to the {ARTIFACT_DIR}/ artifacts of "
          f"{len(logged)} parent run(s) in {resolve_tracking_uri(cfg.mlflow.tracking_uri)}")
    return 0


def after_sweep(args: list[str], say) -> None:
    """The sweep's last step: the task's report; any failure is one warning line, never the sweep's."""
    try:
        files, _, _ = build_report(compose(args))
        say(f"report: {files[0].parent}/report.html")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        say(f"warning: report not written ({type(exc).__name__}: {first}); run `python -m tokprune report` later")
