"""Where a sweep's study lives and what it starts with: the Optuna storage (a journal file on one
machine, an RDB for many), the file lock that makes "count, ask, claim" exact on a journal, and
the trials a study resumes from a recorded ``report.json`` (``sweep.resume_from``)."""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from tokprune.errors import UsageError
from tokprune.search.plan import Plan
from tokprune.search.results import recorded_studies


class Gate:
    """An exclusive file lock for journal studies (one machine); a no-op for RDB studies."""

    def __init__(self, path: str | None):
        self.path, self.fd = path, None

    def __enter__(self):
        if self.path and self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __exit__(self, *exc):
        self.release()


def open_storage(plan: Plan, on_stale) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file (one machine) or an RDB (many), whose heartbeats call
    ``on_stale(study, trial)`` for a trial whose worker died."""
    if not plan.is_rdb:
        Path(plan.storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(plan.storage))
    s = plan.cfg.sweep
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return RDBStorage(
                plan.storage,
                heartbeat_interval=s.heartbeat_interval,
                grace_period=s.grace_period,
                heartbeat_stale_trial_callback=on_stale,
                engine_kwargs={"pool_pre_ping": True},
            )
    except ModuleNotFoundError as exc:
        raise UsageError(f"storage {plan.storage_label}: {exc} (install its driver, e.g. psycopg2-binary)") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"storage {plan.storage_label}: cannot open it ({first})") from None


def resumed_trials(plan: Plan) -> tuple[str, list[FrozenTrial]]:
    """``sweep.resume_from``: (where from, the trials) a study with no trial yet starts with: each
    complete trial the report.json recorded for this study (values, parameters, kept fractions,
    speedups, MLflow run id), and a failed one in each gap (a report records complete trials only),
    so the trials keep their numbers and the sampler, seeded by the trial count, sees the history
    the lost storage held. A sweep whose storage is gone (another machine, a lost sitting) goes on
    where it stopped; the recorded trials' MLflow runs stay in the store they were logged to."""
    path = str(plan.cfg.sweep.resume_from or "")
    if not path:
        return "", []
    option = f"sweep.resume_from={path}"
    recorded = next(
        (r for r in recorded_studies(path, plan.cfg, "sweep.resume_from") if r.study == plan.study_name), None
    )
    if recorded is None:
        raise UsageError(f"{option}: it records no study {plan.study_name}")
    if recorded.overrides != plan.result_overrides:
        print(
            f"[sweep] warning: the trials in {path} ran with overrides {recorded.overrides}, now "
            f"{plan.result_overrides}: the study's trials are not all alike",
            flush=True,
        )
    points = {p.trial: p for p in recorded.points}
    distributions = {param.key: param.optuna_distribution() for param in plan.space.params}
    trials = []
    for number in range(max(points, default=-1) + 1):
        point = points.get(number)
        if point is None:
            trials.append(
                optuna.trial.create_trial(
                    state=TrialState.FAIL,
                    user_attrs={
                        "resumed_from": recorded.carried_from,
                        "error": "not complete where it was resumed from",
                    },
                )
            )
            continue
        if set(point.params) != set(distributions):
            raise UsageError(
                f"{option}: trial {number} has parameters {sorted(point.params)}, this sweep's "
                f"space {sorted(distributions)}"
            )
        attrs = {
            "mlflow_run_id": point.run_id,
            "resumed_from": recorded.carried_from,
            "best/flops_ratio_padded": point.flops_padded,
            **{f"best/kept_fraction/layer_{i}": kept for i, kept in enumerate(point.kept)},
        }
        if number in recorded.speedup:
            attrs["speedup"] = recorded.speedup[number]
        try:
            trials.append(
                optuna.trial.create_trial(
                    params=point.params,
                    distributions=distributions,
                    values=[point.metric, point.flops_real],
                    user_attrs=attrs,
                )
            )
        except ValueError as exc:
            raise UsageError(f"{option}: trial {number} does not fit this sweep's space ({exc})") from None
    return recorded.carried_from, trials
