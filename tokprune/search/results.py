"""A study's results as data: its complete trials (points), front, baseline and measured
speedups, and reading them back from a ``report.json`` (``report.carry``, ``sweep.resume_from``).

Shared by the sweep (which resumes from a recorded report) and the report (which renders them).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from tokprune.errors import UsageError

TARGET_KEY = "protocol.target_flops"  # the FLOPs target every method of protocol=shared trains to hold


def trained_to(params: dict, target: float) -> bool:
    """Whether a trial with these sampled ``params`` trained to FLOPs target ``target`` (the
    report's by-target rows and the checkpoints a sweep keeps for them use this one rule)."""
    return TARGET_KEY in params and math.isclose(float(params[TARGET_KEY]), float(target))


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

    @property
    def seed_flops(self) -> list[float]:
        """The trial's measured FLOPs ratio (real length) and its repeats' (one per seed)."""
        return [self.flops_real, *(float(r["flops_real"]) for r in self.repeats if r.get("flops_real") is not None)]

    def flops_cell(self) -> str:
        """``0.4946`` for one seed; ``0.4880 +- 0.0190`` (mean +- std over seeds) with repeats:
        learned decisions differ by seed, so a mean metric goes with a mean ratio."""
        values = self.seed_flops
        if len(values) < 2:
            return _fmt(self.flops_real)
        return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"

    def metric_cell(self) -> str:
        """``0.8512`` for one seed; ``0.8497 +- 0.0031 (3 seeds)`` with repeats."""
        if not self.repeats:
            return _fmt(self.metric)
        return f"{self.metric_mean:.4f} +- {self.metric_std:.4f} ({len(self.seed_metrics)} seeds)"


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
    protocol: str = "paper"  # the training protocol of its trials (studies from before protocols: paper)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_")

    @property
    def front(self) -> list[Point]:
        return sorted((p for p in self.points if p.pareto), key=lambda p: (p.flops_real, -p.metric))

    @property
    def best(self) -> Point | None:
        """The Pareto point with the highest dev metric (fewest FLOPs among ties)."""
        return max(self.front, key=higher_metric, default=None)

    def point(self, trial: int | None) -> Point | None:
        return next((p for p in self.points if p.trial == trial), None)

    @property
    def baseline_metric(self) -> float:
        """The baseline's dev metric (NaN without a baseline)."""
        return self.baseline["metric"] if self.baseline else math.nan

    def at_target(self, target: float) -> Point | None:
        """The complete trial trained to ``protocol.target_flops`` = ``target`` (a grid's value is held
        by one trial; should several, the one with the most seed repeats, then the earliest, as
        ``repeat target=`` picks: never the luckier)."""
        held = [p for p in self.points if trained_to(p.params, target)]
        return min(held, key=lambda p: (-len(p.repeats), p.trial), default=None)

    def reached_at(self, flops: float) -> float | None:
        """The front's staircase: the best dev metric of a point at or below ``flops``."""
        point = self.point_reached_at(flops)
        return point.metric if point else None

    def point_reached_at(self, flops: float) -> Point | None:
        """The front's point whose metric ``reached_at`` gives."""
        return max((p for p in self.front if p.flops_real <= flops + 1e-12), key=higher_metric, default=None)


def portable(where: str) -> str:
    """A local path or SQLite URI without the machine's folders (committed reports carry no
    absolute path): its last two components; server URLs as they are."""
    prefix = "sqlite:///"
    if where.startswith(prefix):
        return prefix + portable(where[len(prefix) :])
    path = Path(where)
    return str(Path(*path.parts[-2:])) if "://" not in where and path.is_absolute() else where


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
    return [
        MethodResult(
            method=m["method"],
            label=m["label"],
            study=m["study"],
            parent_run_id=m.get("parent_run_id"),
            overrides=list(m.get("overrides", [])),
            points=[Point(**p) for p in m["points"]],
            baseline=m.get("baseline"),
            speedup=_per_trial(m.get("speedup", {})),
            carried_from=m.get("carried_from") or origin,
            resumed_from=m.get("resumed_from", ""),
            resumed_trials=list(m.get("resumed_trials", [])),
            protocol=m.get("protocol", "paper"),
        )
        for m in recorded
    ]


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


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
