"""Render collected results: the operating-points and Pareto tables, the plots, ``pareto.md``,
``report.html`` and ``report.json``, and the same files as MLflow artifacts."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from tokprune.core.data import get_task
from tokprune.reporting.collect import REFERENCE_METHOD, ROLES, batch_sizes
from tokprune.search.plan import param_strings, storage_label
from tokprune.search.results import TARGET_KEY, MethodResult, Point, _fmt, distinct_baselines, portable

ARTIFACT_DIR = "report"


OWNED = ("pareto_*.png", "kept_*.png", "pareto.md", "report.html", "report.json")  # replaced on each run


def role_names(cfg: DictConfig, metric: str) -> dict[str, str]:
    points = 100 * float(cfg.report.metric_tolerance)
    return {
        "best": f"highest dev {metric}",
        "within_flops": f"best at FLOPs ratio <= {cfg.report.flops_budget:g}",
        "near_baseline": f"fewest FLOPs within {points:g} point{'s' * (points != 1)} of the baseline",
    }


def speedup_cell(speedup: float) -> str:
    """``x1.45``; below 1 it is a slowdown and says so: ``x0.83 (slower)``."""
    return f"x{speedup:.2f}" + (" (slower)" if speedup < 1 else "")


def _speedups(result: MethodResult, trial: int, engine: str = "") -> list[str]:
    """One cell per batch size: ``x1.45``; or, in the first, why it was not measured.
    ``engine``: "" torch hard mode, "onnx_" ONNX Runtime (reports before it was timed: empty)."""
    cells = [""] * len(batch_sizes())
    s = result.speedup.get(trial)
    if s and ("skipped" in s or f"{engine}skipped" in s):
        cells[0] = f"skipped: {s.get('skipped') or s[f'{engine}skipped']}"
    elif s and all(f"{engine}batch_{size}" in s for size in batch_sizes()):
        cells = [speedup_cell(s[f"{engine}batch_{size}"]["wall_speedup"]) for size in batch_sizes()]
    return cells


def _reference(results: list[MethodResult], protocol: str) -> MethodResult | None:
    """The ``static`` study trained under ``protocol``: methods are compared under one protocol."""
    return next((r for r in results if r.method == REFERENCE_METHOD and r.protocol == protocol), None)


def operating_rows(results: list[MethodResult], names: dict[str, str]) -> list[list[str]]:
    """Per method and role: the trial, its metric and distance to the baseline, its FLOPs,
    what the ``static`` front reaches at those FLOPs, and its speedups."""
    rows = []
    for r in results:
        reference = _reference(results, r.protocol)
        for role in ROLES:
            p = r.point(r.operating.get(role))
            if p is None:
                rows.append(
                    [
                        r.label,
                        names[role],
                        "—",
                        "no Pareto point qualifies",
                        "",
                        "",
                        "",
                        "",
                        *[""] * 2 * len(batch_sizes()),
                    ]
                )
                continue
            static = reference.point_reached_at(p.flops_real) if reference is not None and reference is not r else None
            rows.append(
                [
                    r.label,
                    names[role],
                    str(p.trial),
                    p.metric_cell(),
                    _fmt(p.metric_mean - r.baseline_metric, 4),
                    _fmt(p.flops_real),
                    static.metric_cell() if static is not None else "—",
                    gap_against(p, static),
                    *_speedups(r, p.trial),
                    *_speedups(r, p.trial, "onnx_"),
                ]
            )
    return rows


def target_rows(results: list[MethodResult], cfg: DictConfig) -> list[list[str]]:
    """Every complete trial of a study that sweeps ``protocol.target_flops``, by protocol and target,
    each beside ``static`` of the same protocol and target (the comparison the targets are
    stated in): not only Pareto points, since a dominated trial is still that method's result
    at that target. Whether the trial held its target: each seed's measured FLOPs ratio (real) <=
    target + ``protocol.selection_epsilon`` (the report's config: the default 0.01)."""
    epsilon = float(cfg.protocol.selection_epsilon)
    rows = []
    trained = [r for r in results if any(TARGET_KEY in p.params for p in r.points)]
    for protocol in dict.fromkeys(r.protocol for r in trained):
        studies = [r for r in trained if r.protocol == protocol]
        reference = _reference(studies, protocol)
        targets = sorted({float(p.params[TARGET_KEY]) for r in studies for p in r.points if TARGET_KEY in p.params})
        for target in targets:
            static = reference.at_target(target) if reference is not None else None
            for r in studies:
                p = r.at_target(target)
                if p is None:
                    continue
                other = static if r is not reference else None
                rows.append(
                    [
                        f"{target:g}",
                        r.label,
                        str(p.trial),
                        p.metric_cell(),
                        _fmt(p.metric_mean - r.baseline_metric, 4),
                        p.flops_cell(),
                        _fmt(p.flops_padded),
                        held_cell(p, target + epsilon),
                        other.metric_cell() if other is not None else "—",
                        gap_against(p, other),
                        *_speedups(r, p.trial),
                    ]
                )
    return rows


def held_cell(point: Point, limit: float) -> str:
    """Whether each seed's measured FLOPs ratio is at or below ``limit``: yes, no, or ``2 of 3 seeds``."""
    held = sum(f <= limit + 1e-12 for f in point.seed_flops)
    total = len(point.seed_flops)
    return "yes" if held == total else "no" if held == 0 else f"{held} of {total} seeds"


def target_header(metric: str, max_length: int) -> list[str]:
    first, *rest = batch_sizes()
    return [
        "FLOPs target",
        "method",
        "trial",
        f"dev {metric} (mean +- std over seeds)",
        "vs baseline",
        "FLOPs ratio (real length; mean +- std over seeds)",
        f"FLOPs ratio (padded to {max_length}, first seed)",
        "held the target (+ selection epsilon)",
        f"{REFERENCE_METHOD} at this target",
        f"vs {REFERENCE_METHOD} (2 SE: twice the standard error of the gap over seeds)",
        f"CPU speedup, torch, batch {first} (operating points and report.timed_targets)",
        *[f"CPU speedup, torch, batch {size}" for size in rest],
    ]


def gap_against(point: Point, other: Point | None) -> str:
    """The difference of the mean metrics, and whether it exceeds the seed spread: ``+0.0123
    (> 2 SE 0.0082)``, ``... (within 2 SE ...)``, or ``(one seed)`` when either has no repeats.
    The number shown is the threshold itself, twice the standard error of the difference
    ``sqrt(s1^2/n1 + s2^2/n2)``, so a reader compares the gap with what is printed."""
    if other is None:
        return "—"
    gap = point.metric_mean - other.metric_mean
    if not point.repeats or not other.repeats:
        return f"{gap:+.4f} (one seed)"
    se = math.sqrt(point.metric_std**2 / len(point.seed_metrics) + other.metric_std**2 / len(other.seed_metrics))
    verdict = "> 2 SE" if abs(gap) > 2 * se else "within 2 SE"
    return f"{gap:+.4f} ({verdict} {2 * se:.4f})"


def operating_header(metric: str, examples: int) -> list[str]:
    first, *rest = batch_sizes()
    return [
        "method",
        "operating point",
        "trial",
        f"dev {metric} (mean +- std over seeds)",
        "vs baseline",
        "FLOPs ratio (real length)",
        f"{REFERENCE_METHOD} at <= these FLOPs",
        f"vs {REFERENCE_METHOD} (2 SE: twice the standard error of the gap over seeds)",
        f"CPU speedup, torch, batch {first} ({examples} dev rows)",
        *[f"CPU speedup, torch, batch {size}" for size in rest],
        f"CPU speedup, ONNX Runtime (exported pruned vs exported unpruned), batch {first}",
        *[f"CPU speedup, ONNX Runtime, batch {size}" for size in rest],
    ]


def table_rows(results: list[MethodResult]) -> list[list[str]]:
    """Baseline(s) first, then each method's Pareto points by FLOPs; the best point marked."""
    rows = []
    for b, runs in distinct_baselines(results):
        rows.append(
            [
                "none (baseline)",
                "—",
                f"run{'s' * (len(runs) > 1)} {', '.join(r[:8] for r in runs)}",
                _fmt(b["metric"]),
                _fmt(b["flops_real"]),
                _fmt(b["flops_padded"]),
                "—",
            ]
        )
    for r in results:
        for p in r.front:
            trial = f"{p.trial} (best)" if p is r.best else str(p.trial)
            measured = " / ".join(c for c in _speedups(r, p.trial) if c)
            rows.append(
                [
                    r.label,
                    trial,
                    " ".join(param_strings(p.params)),
                    p.metric_cell(),
                    _fmt(p.flops_real),
                    _fmt(p.flops_padded),
                    measured,
                ]
            )
    return rows


def header(metric: str, max_length: int) -> list[str]:
    return [
        "method",
        "trial",
        "parameters",
        f"dev {metric}",
        "FLOPs ratio (real length)",
        f"FLOPs ratio (padded to {max_length})",
        f"CPU speedup, batch {' / '.join(map(str, batch_sizes()))} (operating points)",
    ]


def conventions(metric: str, max_length: int) -> str:
    return (
        f"FLOPs are counted by fvcore (1 multiply-add = 1 FLOP), relative to the unpruned encoder on the same "
        f'dev examples at their real length ("real") and padded to task.max_length={max_length} ("padded"). '
        f"Dev {metric} and FLOPs are those of each trial's selected validation. Operating points are read off "
        f"each method's Pareto front (of each trial's first seed); where a trial was repeated with more seeds "
        f"(make repeat) its metric is the mean +- standard deviation over seeds and the plots draw that as an "
        f'error bar; "{REFERENCE_METHOD} at <= these FLOPs" is the best dev {metric} of '
        f'the {REFERENCE_METHOD} front of the same protocol at or below the point\'s FLOPs ratio. "By FLOPs target" '
        f"lists every trial that trained to a protocol.target_flops (Pareto or not) beside the {REFERENCE_METHOD} "
        f"trial of the same protocol and target. Speedup: wall "
        f"time of the unpruned encoder (KeepAll) / the method's own pruner on the same weights, hard mode "
        f"(tokens removed), CPU, on seeded real dev rows, timed in turns; in torch, and in ONNX Runtime (the "
        f"exported pruned graph / the same weights exported unpruned)."
    )


def write(cfg: DictConfig, results: list[MethodResult], out: Path, storage: str, uri: str) -> list[Path]:
    from tokprune.reporting import plots as plots

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
    tables = [
        (
            "Operating points",
            operating_header(metric, int(cfg.report.speedup_examples)),
            operating_rows(results, role_names(cfg, metric)),
        ),
        ("Pareto points", header(metric, max_length), table_rows(results)),
    ]
    by_target = target_rows(results, cfg)
    if by_target:
        tables.insert(1, ("By FLOPs target", target_header(metric, max_length), by_target))
    note = conventions(metric, max_length)
    carried_from = {}
    for r in results:
        if r.carried_from:
            carried_from.setdefault(r.carried_from, []).append(r.label)
    for origin, labels in carried_from.items():
        note += (
            f" Carried from {origin} (report.carry), as recorded there, points, baseline and speedups: "
            f"{', '.join(labels)}."
        )
    for r in results:
        if r.resumed_trials:
            note += (
                f" Resumed from {r.resumed_from} (sweep.resume_from), as recorded there, points and speedups: "
                f"{r.label} trial{'s' * (len(r.resumed_trials) > 1)} {', '.join(map(str, r.resumed_trials))}."
            )
    fresh = [r.study for r in results if not r.carried_from]
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "pareto.md").write_text(plots.markdown(title, note, tables))
    meta = (
        f"Studies: {', '.join(fresh) or 'none'} in {portable(storage_label(storage))}; "
        f"MLflow store {portable(uri)}. Generated {generated}."
    )
    (out / "report.html").write_text(plots.page(title, meta, note, tables, overlay_svg, sections))
    data = {
        "task": task,
        "model": cfg.model.name,
        "budget": cfg.budget.name,
        "seed": cfg.seed,
        "metric": metric,
        "max_length": max_length,
        "flops_convention": plots.CONVENTION,
        "storage": portable(storage_label(storage)),
        "tracking_uri": portable(uri),
        "generated": generated,
        "methods": [asdict(r) for r in results],
    }
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
