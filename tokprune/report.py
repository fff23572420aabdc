"""``python -m tokprune report task=...``: what the sweeps of one task found, on disk and in MLflow.

Reads every sweep study of the task (for the chosen model, budget and seed) from the Optuna
storage (the journal beside the MLflow store unless ``sweep.storage`` says otherwise) and the
MLflow runs the sweeps recorded (parent run, baseline, trial runs), and writes to
``<report.dir>/<task>/``:

- ``pareto_<method>.png``: a method's trials, its Pareto front and the baseline at ratio 1.0;
- ``pareto_all.png``: every method's front on one chart;
- ``kept_<method>.png``: per-layer kept fraction of each Pareto-optimal trial;
- ``pareto.md``: each method's operating points (its best point, its best at FLOPs ratio <=
  ``report.flops_budget``, its fewest FLOPs within ``report.metric_tolerance`` of the
  baseline), each beside what ``static`` reaches at those FLOPs and with a measured hard-mode
  CPU speedup at batch 1 and 32; then every Pareto point;
- ``report.html``: all of the above on one self-contained page (inline SVG, hover a point
  for its parameters); ``report.json``: the same numbers for programs.

``report.carry`` names a ``report.json`` written before (e.g. the committed
``reports/<task>/report.json``): each study it records that this storage does not hold is taken
from it as recorded (points, baseline, measured speedups) and marked as carried, so one report
joins sweeps run on machines or in sittings that share no storage. A study's trials that its
sweep took from a report.json (``sweep.resume_from``) keep the speedups measured there.

The same files replace the ``report/`` artifacts of each study's parent run. The sweep calls
this at its end (``after_sweep``), where a failure only warns.
"""

from __future__ import annotations

import json
import math
import statistics
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
    repeats: list[dict] = field(default_factory=list)  # ``repeat``'s records: the same settings, other seeds

    @property
    def seed_metrics(self) -> list[float]:
        """The trial's dev metric and its repeats' (one per seed)."""
        return [self.metric, *(float(r["metric"]) for r in self.repeats)]

    @property
    def metric_mean(self) -> float:
        return statistics.mean(self.seed_metrics)

    @property
    def metric_std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        values = self.seed_metrics
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def metric_cell(self) -> str:
        """``0.8512`` for one seed; ``0.8497 +- 0.0031 (3 seeds)`` with repeats."""
        if not self.repeats:
            return _fmt(self.metric)
        return f"{self.metric_mean:.4f} +- {self.metric_std:.4f} ({len(self.seed_metrics)} seeds)"


#: The operating points read off each method's front, and how the tables name them.
ROLES = ("best", "within_flops", "near_baseline")
REFERENCE_METHOD = "static"  # the front every learned method is compared with at equal FLOPs


def higher_metric(p: Point) -> tuple[float, float]:
    """Sort key of "the better point": higher dev metric, then fewer FLOPs."""
    return p.metric, -p.flops_real


@dataclass
class MethodResult:
    """One study: a method's points, its baseline, its operating points and their speedups."""

    method: str
    label: str  # the method's name, or the study's when a method has several studies
    study: str
    parent_run_id: str | None
    overrides: list[str]
    points: list[Point]
    baseline: dict | None
    operating: dict = field(default_factory=dict)  # role (ROLES) -> trial number, None when no point qualifies
    speedup: dict = field(default_factory=dict)  # trial number -> measure_speedup's dict
    carried_from: str = ""  # "" = read from this storage now; else the report.json (and its date) it came from
    resumed_from: str = ""  # the report.json a sweep took some of its trials from (sweep.resume_from), or ""
    resumed_trials: list[int] = field(default_factory=list)  # those trials' numbers

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label)

    @property
    def front(self) -> list[Point]:
        return sorted((p for p in self.points if p.pareto), key=lambda p: (p.flops_real, -p.metric))

    @property
    def best(self) -> Point | None:
        """The Pareto point with the highest dev metric (fewest FLOPs among ties)."""
        return max(self.front, key=higher_metric, default=None)

    def point(self, trial: int | None) -> Point | None:
        return next((p for p in self.points if p.trial == trial), None)

    def reached_at(self, flops: float) -> float | None:
        """The front's staircase: the best dev metric of a point at or below ``flops``."""
        point = self.point_reached_at(flops)
        return point.metric if point else None

    def point_reached_at(self, flops: float) -> Point | None:
        """The front's point whose metric ``reached_at`` gives."""
        return max((p for p in self.front if p.flops_real <= flops + 1e-12), key=higher_metric, default=None)


def operating_points(result: MethodResult, flops_budget: float, tolerance: float) -> dict[str, int | None]:
    """The trials a reader compares methods by: the best point on the front; the best at FLOPs
    ratio (real length) <= ``flops_budget``; the fewest FLOPs within ``tolerance`` (absolute, in
    the metric's 0..1 units) of the baseline's metric."""
    front = result.front
    base = result.baseline["metric"] if result.baseline else math.nan
    within = [p for p in front if p.flops_real <= flops_budget]
    near = [p for p in front if math.isfinite(base) and p.metric >= base - tolerance - 1e-12]
    chosen = {"best": result.best,
              "within_flops": max(within, key=higher_metric, default=None),
              "near_baseline": min(near, key=lambda p: (p.flops_real, -p.metric), default=None)}
    return {role: (p.trial if p else None) for role, p in chosen.items()}


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
    mine = [s for s in sweeps if (s.user_attrs.get("model"), s.user_attrs.get("budget"), s.user_attrs.get("seed"))
            == (model, budget, seed)]
    if not mine and not allow_none:
        others = sorted({f"model={s.user_attrs.get('model')} budget={s.user_attrs.get('budget')} "
                         f"seed={s.user_attrs.get('seed')}" for s in sweeps})
        hint = f" (it has studies of {task} for {'; '.join(others)})" if others else ""
        raise UsageError(f"no sweep study of task {task} for model={model} budget={budget} seed={seed} in "
                         f"{storage_label(storage)}{hint}: run `make sweep METHOD=<method> TASK={task} "
                         f"MODEL={model} BUDGET={budget} SEED={seed}` first")
    if not mine:
        return []
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
    """Each study's complete trials, front and baseline, labelled later (``_relabel``)."""
    results = []
    for study in studies:
        method = study.user_attrs["method"]
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        front = {t.number for t in study.best_trials} if complete else set()
        repeats = study.user_attrs.get("repeats", {})  # tokprune.repeat's records
        points = [Point(trial=t.number, params=dict(t.params), metric=t.values[0], flops_real=t.values[1],
                        flops_padded=t.user_attrs.get("best/flops_ratio_padded"),
                        kept=_kept(t.user_attrs, "best/kept_fraction/layer_"),
                        run_id=t.user_attrs.get("mlflow_run_id"), pareto=t.number in front,
                        repeats=list(repeats.get(str(t.number), []))) for t in complete]
        parent_id = study.user_attrs.get("mlflow_parent_run_id")
        try:
            parent = client.get_run(parent_id) if parent_id else None
        except Exception:  # the study names a run this store does not hold
            parent, parent_id = None, None
        resumed = [t for t in complete if t.user_attrs.get("resumed_from")]
        results.append(MethodResult(method=method, label=method, study=study.study_name, parent_run_id=parent_id,
                                    overrides=list(study.user_attrs.get("overrides", [])), points=points,
                                    baseline=_baseline(client, parent, main_metric),
                                    speedup={t.number: t.user_attrs["speedup"] for t in resumed
                                             if t.user_attrs.get("speedup")},
                                    resumed_from=", ".join(sorted({t.user_attrs["resumed_from"] for t in resumed})),
                                    resumed_trials=[t.number for t in resumed]))
    return results


def _per_trial(speedup: dict) -> dict[int, dict]:
    """A recorded ``speedup`` by trial number; the first reports (before operating points) held a
    single bench row there, not one per trial, and it is not read (its table had only batch 1)."""
    return {int(k): v for k, v in speedup.items() if str(k).isdigit()}


def recorded_studies(path: str, cfg: DictConfig, option: str) -> list[MethodResult]:
    """Every study a report.json records, as recorded there (points, baseline, measured speedups),
    each marked with where it came from; a one-line error naming ``option`` for a file that is not
    a report.json or reports another task, model, budget or seed than ``cfg``."""
    try:
        data = json.loads(Path(path).read_text())
        recorded = data["methods"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{option}={path}: cannot read it as a report.json ({type(exc).__name__})") from None
    wanted = {"task": cfg.task.name, "model": cfg.model.name, "budget": cfg.budget.name, "seed": cfg.seed}
    found = {key: data.get(key) for key in wanted}
    if found != wanted:
        say = lambda d: " ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
        raise UsageError(f"{option}={path}: it reports {say(found)}, not {say(wanted)}")
    origin = portable(path) + (f" of {data['generated']}" if data.get("generated") else "")
    return [MethodResult(
        method=m["method"], label=m["label"], study=m["study"], parent_run_id=m.get("parent_run_id"),
        overrides=list(m.get("overrides", [])), points=[Point(**p) for p in m["points"]],
        baseline=m.get("baseline"), speedup=_per_trial(m.get("speedup", {})),
        carried_from=m.get("carried_from") or origin, resumed_from=m.get("resumed_from", ""),
        resumed_trials=list(m.get("resumed_trials", []))) for m in recorded]


def carried(cfg: DictConfig, present: set[str]) -> list[MethodResult]:
    """The studies recorded in ``report.carry`` (a report.json) that ``present`` (the study names
    this storage holds) lacks, as recorded there."""
    path = str(cfg.report.carry or "")
    if not path:
        return []
    return [r for r in recorded_studies(path, cfg, "report.carry") if r.study not in present]


def _relabel(results: list[MethodResult]) -> list[MethodResult]:
    """Ordered by method then study; a method's name labels it unless it has several studies."""
    results = sorted(results, key=lambda r: (r.method, r.study))
    methods = [r.method for r in results]
    for r in results:
        r.label = r.method if methods.count(r.method) == 1 else r.study
    return results


# -- measured speedup of the operating points ----------------------------------------------


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


def measure_speedup(cfg: DictConfig, point: Point, client: MlflowClient, uri: str) -> dict:
    """Hard-mode CPU speedup of one point vs KeepAll at each of ``batch_sizes()``
    (``{"batch_1": bench row, ...}``), or ``{"skipped": why}``."""
    from tokprune.bench import checkpoint_speedup

    examples = int(cfg.report.speedup_examples)
    if examples <= 0:
        return {"skipped": "report.speedup_examples=0"}
    if not point.run_id:
        return {"skipped": "no MLflow run"}
    path = _checkpoint(client, point.run_id, uri)
    if path is None or not path.is_file():
        return {"skipped": f"checkpoint missing ({path or 'not recorded'})"}
    try:
        timed = checkpoint_speedup(str(path), cfg.data.glue_dir, examples, batch_sizes())
    except Exception as exc:  # one method's checkpoint must not stop the report: say why in its cell
        return {"skipped": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
    return {"checkpoint": portable(str(path)), **{f"batch_{row['batch_size']}": row for row in timed}}


# -- outputs ---------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def role_names(cfg: DictConfig, metric: str) -> dict[str, str]:
    points = 100 * float(cfg.report.metric_tolerance)
    return {"best": f"highest dev {metric}", "within_flops": f"best at FLOPs ratio <= {cfg.report.flops_budget:g}",
            "near_baseline": f"fewest FLOPs within {points:g} point{'s' * (points != 1)} of the baseline"}


def batch_sizes() -> tuple[int, ...]:
    """The batch sizes speedups are timed and tabled at (bench's, as ``eval`` uses them)."""
    from tokprune.bench import LATENCY_BATCH_SIZES  # bench loads torch: only once a report is measured or written

    return LATENCY_BATCH_SIZES


def _speedups(result: MethodResult, trial: int) -> list[str]:
    """One cell per batch size: ``x1.45``; or, in the first, why it was not measured."""
    cells = [""] * len(batch_sizes())
    s = result.speedup.get(trial)
    if s and "skipped" in s:
        cells[0] = f"skipped: {s['skipped']}"
    elif s:
        cells = [f"x{s[f'batch_{size}']['wall_speedup']:.2f}" for size in batch_sizes()]
    return cells


def _reference(results: list[MethodResult]) -> MethodResult | None:
    return next((r for r in results if r.method == REFERENCE_METHOD), None)


def operating_rows(results: list[MethodResult], names: dict[str, str]) -> list[list[str]]:
    """Per method and role: the trial, its metric and distance to the baseline, its FLOPs,
    what the ``static`` front reaches at those FLOPs, and its speedups."""
    reference, rows = _reference(results), []
    for r in results:
        base = r.baseline["metric"] if r.baseline else math.nan
        for role in ROLES:
            p = r.point(r.operating.get(role))
            if p is None:
                rows.append([r.label, names[role], "—", "no Pareto point qualifies", "", "", "",
                             *[""] * len(batch_sizes())])
                continue
            static = reference.point_reached_at(p.flops_real) if reference is not None and reference is not r else None
            rows.append([r.label, names[role], str(p.trial), p.metric_cell(), _fmt(p.metric_mean - base, 4),
                         _fmt(p.flops_real), static.metric_cell() if static is not None else "—",
                         gap_against(p, static), *_speedups(r, p.trial)])
    return rows


def gap_against(point: Point, other: Point | None) -> str:
    """The difference of the mean metrics, and whether it exceeds the seed spread: ``+0.0123
    (> spread 0.0041)``, ``... (within spread ...)``, or ``(one seed)`` when either has no repeats.
    The spread is the standard error of the difference, ``sqrt(s1^2/n1 + s2^2/n2)``."""
    if other is None:
        return "—"
    gap = point.metric_mean - other.metric_mean
    if not point.repeats or not other.repeats:
        return f"{gap:+.4f} (one seed)"
    spread = math.sqrt(point.metric_std**2 / len(point.seed_metrics) + other.metric_std**2 / len(other.seed_metrics))
    verdict = "> spread" if abs(gap) > 2 * spread else "within spread"
    return f"{gap:+.4f} ({verdict} {spread:.4f})"


def operating_header(metric: str, examples: int) -> list[str]:
    first, *rest = batch_sizes()
    return ["method", "operating point", "trial", f"dev {metric} (mean +- std over seeds)", "vs baseline",
            "FLOPs ratio (real length)", f"{REFERENCE_METHOD} at <= these FLOPs",
            f"vs {REFERENCE_METHOD} (> spread: the gap exceeds twice its standard error)",
            f"CPU speedup, batch {first} ({examples} dev rows)",
            *[f"CPU speedup, batch {size}" for size in rest]]


def distinct_baselines(results: list[MethodResult]) -> list[tuple[dict, list[str]]]:
    """The baselines the studies name, one per distinct (metric, FLOPs) with the run ids that
    reached it: the baseline trains deterministically, so sittings that share no store retrain
    the same one (``report.carry``, ``sweep.resume_from``), and a reader should see one point."""
    found: dict[tuple, tuple[dict, list[str]]] = {}
    for r in results:
        b = r.baseline
        if not b:
            continue
        key = (round(float(b["metric"]), 6), round(float(b.get("flops_real") or 1.0), 6))
        base, runs = found.setdefault(key, (b, []))
        if b["run_id"] not in runs:
            runs.append(b["run_id"])
    return list(found.values())


def table_rows(results: list[MethodResult]) -> list[list[str]]:
    """Baseline(s) first, then each method's Pareto points by FLOPs; the best point marked."""
    rows = []
    for b, runs in distinct_baselines(results):
        rows.append(["none (baseline)", "—", f"run{'s' * (len(runs) > 1)} {', '.join(r[:8] for r in runs)}",
                     _fmt(b["metric"]), _fmt(b["flops_real"]), _fmt(b["flops_padded"]), "—"])
    for r in results:
        for p in r.front:
            trial = f"{p.trial} (best)" if p is r.best else str(p.trial)
            measured = " / ".join(c for c in _speedups(r, p.trial) if c)
            rows.append([r.label, trial, " ".join(param_strings(p.params)), p.metric_cell(), _fmt(p.flops_real),
                         _fmt(p.flops_padded), measured])
    return rows


def header(metric: str, max_length: int) -> list[str]:
    return ["method", "trial", "parameters", f"dev {metric}", "FLOPs ratio (real length)",
            f"FLOPs ratio (padded to {max_length})",
            f"CPU speedup, batch {' / '.join(map(str, batch_sizes()))} (operating points)"]


def conventions(metric: str, max_length: int) -> str:
    return (f"FLOPs are counted by fvcore (1 multiply-add = 1 FLOP), relative to the unpruned encoder on the same "
            f"dev examples at their real length (\"real\") and padded to task.max_length={max_length} (\"padded\"). "
            f"Dev {metric} and FLOPs are those of each trial's selected validation. Operating points are read off "
            f"each method's Pareto front (of each trial's first seed); where a trial was repeated with more seeds "
            f"(make repeat) its metric is the mean +- standard deviation over seeds and the plots draw that as an "
            f"error bar; \"{REFERENCE_METHOD} at <= these FLOPs\" is the best dev {metric} of "
            f"the {REFERENCE_METHOD} front at or below the point's FLOPs ratio. Speedup: wall time of the unpruned "
            f"encoder (KeepAll) / the method's own pruner on the same weights, hard mode (tokens removed), CPU, "
            f"on seeded real dev rows, timed in turns.")


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
    tables = [("Operating points", operating_header(metric, int(cfg.report.speedup_examples)),
               operating_rows(results, role_names(cfg, metric))),
              ("Pareto points", header(metric, max_length), table_rows(results))]
    note = conventions(metric, max_length)
    carried_from = {}
    for r in results:
        if r.carried_from:
            carried_from.setdefault(r.carried_from, []).append(r.label)
    for origin, labels in carried_from.items():
        note += (f" Carried from {origin} (report.carry), as recorded there, points, baseline and speedups: "
                 f"{', '.join(labels)}.")
    for r in results:
        if r.resumed_trials:
            note += (f" Resumed from {r.resumed_from} (sweep.resume_from), as recorded there, points and speedups: "
                     f"{r.label} trial{'s' * (len(r.resumed_trials) > 1)} {', '.join(map(str, r.resumed_trials))}.")
    fresh = [r.study for r in results if not r.carried_from]
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "pareto.md").write_text(plots.markdown(title, note, tables))
    meta = (f"Studies: {', '.join(fresh) or 'none'} in {portable(storage_label(storage))}; "
            f"MLflow store {portable(uri)}. Generated {generated}.")
    (out / "report.html").write_text(plots.page(title, meta, note, tables, overlay_svg, sections))
    data = {"task": task, "model": cfg.model.name, "budget": cfg.budget.name, "seed": cfg.seed, "metric": metric,
            "max_length": max_length, "flops_convention": plots.CONVENTION, "storage": portable(storage_label(storage)),
            "tracking_uri": portable(uri), "generated": generated, "methods": [asdict(r) for r in results]}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return sorted(p for pattern in OWNED for p in out.glob(pattern))


def log_to_mlflow(client: MlflowClient, results: list[MethodResult], files: list[Path]) -> list[str]:
    """Replace the ``report/`` artifacts of each study's parent run with these files."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    logged = []
    for run_id in dict.fromkeys(r.parent_run_id for r in results if r.parent_run_id and not r.carried_from):
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
    studies = find_studies(cfg, storage, allow_none=bool(cfg.report.carry))
    earlier = carried(cfg, {s.study_name for s in studies})  # checked before a store is opened
    if not studies and not earlier:
        raise UsageError(f"report.carry={cfg.report.carry} records no study and {storage_label(storage)} holds none "
                         f"of task {cfg.task.name}: run `make sweep METHOD=<method> TASK={cfg.task.name}` first")
    client = MlflowClient(uri)
    results = _relabel(collect(studies, client, get_task(cfg.task.name).main_metric) + earlier)
    for r in results:
        r.operating = operating_points(r, float(cfg.report.flops_budget), float(cfg.report.metric_tolerance))
        for trial in dict.fromkeys(t for t in r.operating.values() if t is not None):
            if trial in r.speedup:  # measured where it was carried or resumed from
                continue
            r.speedup[trial] = (measure_speedup(cfg, r.point(trial), client, uri) if not r.carried_from
                                else {"skipped": "not measured where it was carried from"})
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
