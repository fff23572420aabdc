"""``python -m tokprune sweep method=... task=...``: the accuracy-vs-FLOPs Pareto front.

One Optuna study per (method, task, model, budget, seed): maximise the task's main dev
metric, minimise the FLOPs ratio at real length, both from the best epoch. Each trial is an
ordinary ``train()`` run nested under one MLflow parent run per study. The search space is
``sweeps/<method>.yaml`` (see ``search.plan``), so a new method joins by adding that file.

Resuming is the same command again: the study, the parent run and the baseline are found
again (by name and by tags) and only the missing trials run; ``sweep.trials`` is the total.
Exactness and crashes:

- journal storage (the default, one machine): a file lock around "count, ask, claim" makes
  the total exact; a RUNNING trial whose process (hostname + pid + start time, stored as
  user attrs) is gone is failed and re-queued with the same values;
- RDB storage (``sweep.storage=postgresql://...``, many machines): Optuna's heartbeats fail
  stale trials (and re-queue them); a trial asked beyond the total is dropped at once.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import optuna
import torch
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tokprune.config import compose, override
from tokprune.core.liveness import HOST, alive, owner, proc_start
from tokprune.errors import Stopped, UsageError
from tokprune.search import records as track
from tokprune.search.plan import FLOPS, Plan, param_strings, plan_sweep
from tokprune.search.results import trained_to
from tokprune.search.storage import Gate, open_storage, resumed_trials
from tokprune.training.baseline import find_or_train
from tokprune.training.tracking import PARENT, ROLE, experiment_id, run_tags
from tokprune.training.train import train

WORKER_ENV = "TOKPRUNE_SWEEP_WORKER"  # set on the processes that `sweep.workers=N` starts
_received: list[int] = []  # the signals (SIGINT, SIGTERM) this process got during the sweep


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop after marking the running trial failed."""


class TrialFailed(Exception):
    """A trial whose loss or objective is not a finite number."""


class Surplus(Exception):
    """A trial asked after the study already had its total (RDB storage, racing workers)."""


class Sweep:
    """One process's share of a study: setup (study, parent run, baseline), then trials."""

    def __init__(self, plan: Plan, label: str = ""):
        self.plan, self.label = plan, label
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=plan.cfg.sweep.max_retry)
        self.gate = Gate(None if plan.is_rdb else plan.storage + ".sweep-lock")
        self.resumed = resumed_trials(plan)  # a bad report is an error before any store opens
        self.storage = open_storage(plan, self._stale)  # first: a bad URL is an error before the MLflow store opens
        self.client = MlflowClient(plan.tracking_uri)
        self.exp_id = self.parent_id = None
        self.baseline: dict = {}
        self.outcome = None
        self.shown_front = ""  # the front table this process printed last

    def say(self, message: str) -> None:
        print(f"[sweep{self.label}] {message}", flush=True)

    def _stale(self, study: optuna.Study, trial) -> None:
        """A trial whose worker died: re-queue its values, close its MLflow run(s)."""
        self.say(f"trial {trial.number} was left running by a dead worker: failed, re-queued with the same values")
        self.retry(study, trial)
        if self.parent_id:
            track.close_trial_runs(
                self.client, self.exp_id, self.parent_id, trial.number, "KILLED", replace=("RUNNING", "FINISHED")
            )

    def reap(self, study: optuna.Study) -> None:
        if self.plan.is_rdb:
            optuna.storages.fail_stale_trials(study)  # heartbeats; calls self._stale
        else:  # under the gate: a RUNNING trial with no owner, or a dead one on this host, is stale
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                host = t.user_attrs.get("host")
                if host not in (None, HOST) or alive(t.user_attrs.get("pid"), t.user_attrs.get("pid_start")):
                    continue
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                self._stale(study, next(f for f in study.get_trials(deepcopy=False) if f.number == t.number))
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for run_id in track.close_orphans(self.client, self.exp_id, self.parent_id, running):
            self.say(f"MLflow run {run_id} belonged to a dead trial: marked KILLED")

    def load(self) -> optuna.Study:
        """The study with a TPE sampler seeded by (seed, trials so far): reproducible with one
        worker, and parallel workers do not draw the same values."""
        study = optuna.load_study(study_name=self.plan.study_name, storage=self.storage)
        n = len(study.get_trials(deepcopy=False))
        study.sampler = optuna.samplers.TPESampler(
            seed=(self.plan.cfg.seed * 1_000_003 + n) % 2**32, n_startup_trials=self.plan.startup_trials
        )
        return study

    # -- setup ------------------------------------------------------------------------

    def setup(self) -> optuna.Study:
        """Under the gate: the study and its MLflow parent run, found or created; then, under the
        baseline's own lock, the baseline."""
        plan, cfg = self.plan, self.plan.cfg
        with self.gate:
            study = self._study()
            recorded = {k: d for t in study.get_trials(deepcopy=False) for k, d in t.distributions.items()}
            self.plan = plan = replace(plan, space=plan.space.as_recorded(recorded, plan.study_name))
            self.add_resumed(study)
            self.exp_id = experiment_id(self.client, cfg.mlflow.experiment, plan.tracking_uri)
            tags = {
                "sweep_id": study.user_attrs["sweep_id"],
                **run_tags(cfg, "sweep"),
                "study": plan.study_name,
                "storage": plan.storage_label,
                "trials": str(plan.target),
                **owner(),
                **{f"space.{k}": v for k, v in plan.space.describe().items()},
            }
            self.parent_id = track.parent_run(self.client, self.exp_id, tags, f"sweep-{plan.study_name}")
            for key, value in tags.items():
                self.client.set_tag(self.parent_id, key, value)
            logged = self.client.get_run(self.parent_id).data.params
            space = {f"space.{k}": v for k, v in plan.space.describe().items() if f"space.{k}" not in logged}
            if space:  # the search space as params (the compare view's axes), once per parent
                self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in space.items()])
            if study.user_attrs.get("mlflow_parent_run_id") != self.parent_id:
                study.set_user_attr("mlflow_parent_run_id", self.parent_id)
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            self.say(f"study {plan.study_name}: {done}/{plan.target} trials complete; storage {plan.storage_label}")
            self.say(
                f"MLflow store {plan.tracking_uri}, experiment {cfg.mlflow.experiment}, parent run "
                f"{self.parent_id} (make ui; filter tags.pareto = 'true')"
            )
            self.reap(study)
        with self.baseline_gate():  # not under the study gate: training it takes minutes
            self.baseline = self._baseline()
        return study

    def baseline_gate(self) -> Gate:
        """A lock for finding or training this sweep's baseline (journal studies): workers that need
        the same one wait for it, while every other study on the machine goes on (under the
        study gate, a QQP baseline's 15 minutes held up every other sweep's next trial)."""
        if self.plan.is_rdb:
            return Gate(None)
        cfg = self.plan.cfg
        key = f"{cfg.task.name}-{cfg.model.name}-{cfg.budget.name}-seed{cfg.seed}"
        return Gate(f"{self.plan.storage}.baseline-{key}.lock")

    def _study(self) -> optuna.Study:
        plan, cfg = self.plan, self.plan.cfg
        study = optuna.create_study(
            study_name=plan.study_name, storage=self.storage, load_if_exists=True, directions=["maximize", "minimize"]
        )
        if study.directions != [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]:
            raise UsageError(f"study {plan.study_name} in {plan.storage_label} is not a sweep study of this kind")
        if study.user_attrs.get("overrides", plan.result_overrides) != plan.result_overrides:
            raise UsageError(
                f"study {plan.study_name} was started with overrides {study.user_attrs['overrides']}, not "
                f"{plan.result_overrides}: its trials would not be alike; name another study for these "
                f"settings (sweep.study_name=...)"
            )
        study.set_metric_names([plan.main_metric, FLOPS])
        attrs = {
            "method": plan.space.method,
            "task": cfg.task.name,
            "model": cfg.model.name,
            "budget": cfg.budget.name,
            "seed": cfg.seed,
            "space": plan.space.describe(),
            "overrides": plan.result_overrides,
            "mlflow_tracking_uri": plan.tracking_uri,
            "sweep_id": uuid.uuid4().hex,
        }  # tells this study from an earlier one of the same name
        for key, value in attrs.items():
            if key not in study.user_attrs:
                study.set_user_attr(key, value)
        return study

    def add_resumed(self, study: optuna.Study) -> None:
        """The trials ``sweep.resume_from`` recorded (``resumed_trials``), added when the study has
        none yet; a study with trials of its own is left as it is."""
        origin, trials = self.resumed
        if not trials:
            return
        name = self.plan.study_name
        if study.get_trials(deepcopy=False):
            self.say(f"sweep.resume_from: not used, study {name} already has trials in {self.plan.storage_label}")
            return
        study.add_trials(trials)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        self.say(
            f"study {name}: resumed {complete} complete trial(s) of {len(trials)} from {origin} (sweep.resume_from)"
        )

    def _baseline(self) -> dict:
        """The unpruned run (method=none) for this task, model, budget and seed: the FLOPs-ratio-1.0
        point, trained once and shared by every sweep of every method (and ToP's teacher)."""
        run = find_or_train(self.plan.cfg, train, self.say, self.client, self.exp_id)
        metric = run.data.metrics.get(f"best/{self.plan.main_metric}", float("nan"))
        flops = run.data.metrics.get(f"best/{FLOPS}", 1.0)
        parent_tags = self.client.get_run(self.parent_id).data.tags
        if parent_tags.get("baseline_run_id") != run.info.run_id:
            self.client.set_tag(self.parent_id, "baseline_run_id", run.info.run_id)
            self.client.set_tag(self.parent_id, "baseline_checkpoint", run.data.tags.get("checkpoint", ""))
            self.client.log_metric(self.parent_id, f"baseline/{self.plan.main_metric}", metric)
            self.client.log_metric(self.parent_id, f"baseline/{FLOPS}", flops)
        return {
            "run_id": run.info.run_id,
            "metric": metric,
            "flops": flops,
            "checkpoint": run.data.tags.get("checkpoint", ""),
        }

    # -- trials -----------------------------------------------------------------------

    def run_trials(self) -> int:
        """Run trials until the study has ``target`` complete ones; 0, or 1 after too many failures."""
        plan, failures, waiting = self.plan, 0, False
        while True:
            with self.gate:
                study = self.load()
                self.reap(study)
                done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if done >= plan.target:
                    return 0
                busy = done + running >= plan.target
                if not busy:
                    self.outcome, waiting = None, False
                    self.queue_grid_value(study)
                    study.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=[self.after_trial])
            if busy:
                if not waiting:
                    dead = (
                        f" (a dead worker's trial fails after {plan.cfg.sweep.grace_period} s without a heartbeat)"
                        if plan.is_rdb
                        else ""
                    )
                    self.say(
                        f"{done}/{plan.target} done; waiting for {running} trial(s) running in other workers" + dead
                    )
                waiting = True
                time.sleep(plan.cfg.sweep.poll_seconds)
                continue
            failures = failures + 1 if self.outcome == "fail" else (0 if self.outcome == "complete" else failures)
            if failures >= plan.cfg.sweep.max_failures:
                self.say(f"stopping: {failures} trials in a row failed (see the errors above)")
                return 1

    def queue_grid_value(self, study: optuna.Study) -> None:
        """With a ``grid`` parameter, the next trial takes the first grid value that no complete,
        running or queued trial holds (a failed value is taken again); no grid: the sampler's."""
        grid = self.plan.space.grid
        if grid is None or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return  # a queued trial (e.g. a dead worker's, requeued) goes first
        held = {
            t.params.get(grid.key)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        }
        value = next((v for v in grid.choices if v not in held), None)
        if value is not None:
            study.enqueue_trial({grid.key: value})

    def claim(self, trial: optuna.Trial) -> None:
        """Mark the trial as this process's; then, with RDB storage, drop it if it is one too many."""
        for key, value in {
            "host": HOST,
            "pid": os.getpid(),
            "pid_start": proc_start(os.getpid()),
            "mlflow_run_id": None,
            "error": None,
        }.items():
            trial.set_user_attr(key, value)
        self.gate.release()
        if self.plan.is_rdb:
            taken = [
                t.number
                for t in trial.study.get_trials(deepcopy=False)
                if t.state in (TrialState.COMPLETE, TrialState.RUNNING)
            ]
            if trial.number not in sorted(taken)[: self.plan.target]:
                trial.set_user_attr("surplus", True)
                self.outcome = "surplus"
                raise Surplus(f"trial {trial.number} is beyond the {self.plan.target} wanted")

    def trial_arguments(self, values: dict) -> list[str]:
        """A trial's command: the sweep's, its sampled values, and the baseline's checkpoint in the
        space's ``baseline_checkpoint`` key (unless the command sets that key)."""
        plan = self.plan
        teacher = plan.space.baseline_checkpoint
        given = {a.partition("=")[0] for a in plan.passthrough}
        extra = [override(teacher, self.baseline["checkpoint"])] if teacher and teacher not in given else []
        return [*plan.args, *(override(k, v) for k, v in values.items()), *extra]

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        plan = self.plan
        self.claim(trial)
        self.outcome = "fail"  # until it completes: an error before training counts as a failure too
        values = plan.space.suggest(trial)
        shown = " ".join(param_strings(values))
        taken = len(trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))
        self.say(f"trial {trial.number} started ({taken} of {plan.target}): {shown}")
        cfg = compose([*self.trial_arguments(values), f"mlflow.run_name={plan.study_name}-trial{trial.number}"])
        cfg.sweep.storage = plan.storage_label  # no password in the run's params
        tags = {
            PARENT: self.parent_id,
            ROLE: "trial",
            "trial": str(trial.number),
            "study": plan.study_name,
            "seed": str(cfg.seed),
        }
        start = time.perf_counter()
        try:
            result = train(cfg, callbacks=[TrialLink(trial, values), FiniteLoss()], tags=tags)
        except BaseException as exc:
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
            self.outcome = "interrupted" if stopped else "fail"
            error = (
                f"interrupted ({signal.Signals(_received[0]).name})"
                if stopped and _received
                else f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            )
            trial.set_user_attr("error", error)
            track.close_trial_runs(
                self.client,
                self.exp_id,
                self.parent_id,
                trial.number,
                "KILLED" if stopped else "FAILED",
                replace=("RUNNING", "FAILED") if stopped else ("RUNNING",),
            )
            if stopped and not isinstance(exc, Interrupted):
                raise Interrupted(str(exc)) from exc
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("checkpoint", result.checkpoint)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        for key, value in result.best.items():
            trial.set_user_attr(key.replace("val/", "best/"), value)
        objective = (result.best.get(f"val/{plan.main_metric}", math.nan), result.best.get(f"val/{FLOPS}", math.nan))
        if not all(math.isfinite(v) for v in objective):
            self.client.set_terminated(result.run_id, status="FAILED")
            raise TrialFailed(f"objective values {objective} are not finite numbers")
        self.outcome = "complete"
        return objective

    def after_trial(self, study: optuna.Study, trial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        if trial.state == TrialState.COMPLETE:
            metric, flops = trial.values
            self.say(
                f"trial {trial.number} done: {self.plan.main_metric}={metric:.4f} {FLOPS}={flops:.3f} "
                f"({trial.user_attrs.get('seconds', 0):.0f} s)"
            )
        else:
            self.say(f"trial {trial.number} failed: {trial.user_attrs.get('error') or 'see above'}")
        self.show_front(study)

    def show_front(self, study: optuna.Study) -> None:
        table = track.front_table(study, self.plan, self.baseline)
        if table != self.shown_front:
            print(table, flush=True)
            self.shown_front = table

    # -- the end ----------------------------------------------------------------------

    def finalize(self, study: optuna.Study, status: str | None) -> None:
        """Pareto tags on the trial runs, the summary table on the parent run."""
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        front = {t.number: t.user_attrs.get("mlflow_run_id") for t in (study.best_trials if complete else [])}
        track.tag_pareto(self.client, self.exp_id, self.parent_id, front)
        track.log_summary(self.client, self.parent_id, study, self.plan, self.baseline, front)
        if status == "FINISHED" and self.plan.cfg.sweep.keep_checkpoints == "pareto":
            timed = self.plan.cfg.report.timed_targets
            self.drop_dominated_checkpoints([t for t in complete if not kept(t, front, timed)])
        if status:
            self.client.set_terminated(self.parent_id, status=status)

    def drop_dominated_checkpoints(self, dominated: list) -> None:
        """``sweep.keep_checkpoints=pareto``: a dominated trial stays dominated as trials are
        added, so its checkpoint can go (its MLflow run stays, tagged ``checkpoint_deleted``)."""
        freed = 0
        for trial in dominated:
            path = Path(trial.user_attrs.get("checkpoint") or "")
            if not path.is_file():
                continue
            freed += path.stat().st_size
            path.unlink()
            if trial.user_attrs.get("mlflow_run_id"):
                self.client.set_tag(trial.user_attrs["mlflow_run_id"], "checkpoint_deleted", "dominated trial")
        if freed:
            self.say(
                f"deleted the checkpoints of dominated trials ({freed / 2**20:.0f} MiB; "
                "sweep.keep_checkpoints=all keeps them)"
            )


def kept(trial: optuna.trial.FrozenTrial, front: dict, timed_targets) -> bool:
    """Whether ``sweep.keep_checkpoints=pareto`` keeps a complete trial's checkpoint: it is on the
    Pareto front, or it trained to one of ``report.timed_targets`` (the report times that trial,
    on the front or not, for the by-target table's speedups)."""
    return trial.number in front or any(trained_to(trial.params, t) for t in timed_targets)


class TrialLink(L.Callback):
    """As soon as the trial's MLflow run exists: its id on the Optuna trial, the sampled values on the run."""

    def __init__(self, trial: optuna.Trial, values: dict):
        self.trial, self.values = trial, values

    def setup(self, trainer, pl_module, stage):
        self.trial.set_user_attr("mlflow_run_id", trainer.logger.run_id)
        trainer.logger.log_hyperparams({f"sampled.{k}": v for k, v in self.values.items()})


class FiniteLoss(L.Callback):
    """Fail the trial at the first NaN/inf training loss instead of training on garbage."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            raise TrialFailed(f"training loss is {loss.detach().float().mean().item()} at step {trainer.global_step}")


# -- entry points -------------------------------------------------------------------------


def _raise_interrupted(signum, frame):
    if _received:  # already stopping: let the clean-up finish
        return
    _received.append(signum)
    raise Interrupted(signal.Signals(signum).name)


def _spawn_workers(plan: Plan) -> int:
    """``sweep.workers=N``: N processes of this same command on the same study."""
    cmd = [sys.executable, "-m", "tokprune", "sweep", *plan.args, "sweep.workers=1"]
    procs = [subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: str(i + 1)}) for i in range(plan.workers)]
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if received:
        return 128 + received[0]
    return max(codes)


@dataclass
class SweepOutcome:
    """How a sweep ended: its exit code, and (for the process that ran the study, not a worker) the
    arguments of the task's report, which the caller writes next (reporting sits above search)."""

    code: int
    report_args: list[str] | None = None
    say: Callable[[str], None] = print


def run_sweep(args: list[str]) -> SweepOutcome:
    """The ``sweep`` command. Bad input raises ``UsageError`` before anything trains."""
    plan = plan_sweep(args)
    worker = os.environ.get(WORKER_ENV)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sweep = Sweep(plan, label=f" worker {worker}" if worker else "")
        _received.clear()
        old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
        study = None
        try:
            study = sweep.setup()
            if plan.workers > 1 and not worker:
                code = _spawn_workers(plan)
            else:
                code = sweep.run_trials()
        except (Interrupted, SystemExit):  # Lightning turns Ctrl-C during fit into SystemExit
            if not _received:
                raise
            for s in old:
                signal.signal(s, signal.SIG_IGN)
            name = signal.Signals(_received[0]).name
            sweep.say(f"interrupted ({name}): a running trial was marked failed; run the same command to resume")
            if study is not None and not worker:
                sweep.finalize(sweep.load(), status="KILLED")
            raise Stopped(_received[0]) from None  # the CLI's one line and exit code 128 + signum
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        if worker:
            return SweepOutcome(code)
        study = sweep.load()
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        sweep.finalize(study, status="FINISHED" if complete >= plan.target else ("KILLED" if code > 128 else None))
        sweep.show_front(study)  # unless the last trial's report above was this same table
        sweep.say(
            f"MLflow store {plan.tracking_uri}, parent run {sweep.parent_id}; Optuna study {plan.study_name} "
            f"in {plan.storage_label}"
        )
        return SweepOutcome(
            code if code else (0 if complete >= plan.target else 1),
            [*plan.args, f"sweep.storage={plan.storage}"],
            sweep.say,
        )
