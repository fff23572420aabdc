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

from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from tokprune.config import compose
from tokprune.core.data import get_task
from tokprune.errors import UsageError
from tokprune.reporting.collect import (
    carried,
    collect,
    find_studies,
    locate,
    measure_speedup,
    operating_points,
    relabel,
)
from tokprune.reporting.render import ARTIFACT_DIR, log_to_mlflow, write
from tokprune.search.plan import storage_label
from tokprune.search.results import MethodResult
from tokprune.training.tracking import resolve_tracking_uri


def build_report(cfg: DictConfig) -> tuple[list[Path], list[MethodResult], list[str]]:
    """Read, measure, write, log: (the files written, what they show, parent runs logged to)."""
    uri, storage, out = locate(cfg)
    studies = find_studies(cfg, storage, allow_none=bool(cfg.report.carry))
    earlier = carried(cfg, {s.study_name for s in studies})  # checked before a store is opened
    if not studies and not earlier:
        raise UsageError(
            f"report.carry={cfg.report.carry} records no study and {storage_label(storage)} holds none "
            f"of task {cfg.task.name}: run `make sweep METHOD=<method> TASK={cfg.task.name}` first"
        )
    client = MlflowClient(uri)
    results = relabel(collect(studies, client, get_task(cfg.task.name).main_metric) + earlier)
    for r in results:
        r.operating = operating_points(r, float(cfg.report.flops_budget), float(cfg.report.metric_tolerance))
        for trial in timed_trials(r, cfg.report.timed_targets):
            if trial in r.speedup:  # measured where it was carried or resumed from
                continue
            r.speedup[trial] = (
                measure_speedup(cfg, r.point(trial), client, uri)
                if not r.carried_from
                else {"skipped": "not measured where it was carried from"}
            )
    files = write(cfg, results, out, storage, uri)
    return files, results, log_to_mlflow(client, results, files)


def timed_trials(result: MethodResult, targets) -> list[int]:
    """The trials whose CPU speedup the report measures: the operating points, then the trial
    trained to each of ``targets`` (``report.timed_targets``), so the by-target table carries the
    speedups a reader compares methods by at one target."""
    at_targets = (result.at_target(float(t)) for t in targets)
    trials = [*result.operating.values(), *(p.trial for p in at_targets if p is not None)]
    return list(dict.fromkeys(t for t in trials if t is not None))


def run_report(args: list[str]) -> int:
    """The ``report`` command."""
    cfg = compose(args)
    files, results, logged = build_report(cfg)
    out = files[0].parent
    print((out / "pareto.md").read_text().split("\n", 4)[-1].strip())
    print(
        f"wrote {out}/report.html (+ {len(files) - 1} files); logged them to the {ARTIFACT_DIR}/ artifacts of "
        f"{len(logged)} parent run(s) in {resolve_tracking_uri(cfg.mlflow.tracking_uri)}"
    )
    return 0


def after_sweep(args: list[str], say) -> None:
    """The sweep's last step: the task's report; any failure is one warning line, never the sweep's."""
    try:
        files, _, _ = build_report(compose(args))
        say(f"report: {files[0].parent}/report.html")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        say(f"warning: report not written ({type(exc).__name__}: {first}); run `python -m tokprune report` later")
