"""`tokprune sweep`: Optuna study + MLflow parent/child runs, resumable, parallel, crash-safe.

Trials are model=tiny, budget=smoke on real SST-2 rows (seconds each). method=none has no
knobs, so the sweeps here read a search space from tmp_path that varies train.lr.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import tokprune.search.sweep as sweep_module
from tokprune.cli import main
from tokprune.config import choices, compose, override
from tokprune.core.liveness import HOST
from tokprune.errors import UsageError
from tokprune.search.plan import load_space
from tokprune.search.results import portable
from tokprune.search.sweep import FiniteLoss, Surplus, Sweep, TrialFailed, plan_sweep
from tokprune.training.tracking import experiment_id

from conftest import ROOT

STUDY = "none-sst2-tiny-smoke-seed42"
FAST = ["model=tiny", "budget=smoke", "train.max_steps=2", "data.train_subset=32", "data.eval_subset=32"]
SPACE = """trials: {smoke: 3, default: 5}
params:
  train.lr: {distribution: float, low: 1.0e-5, high: 1.0e-3, log: true}
"""


@pytest.fixture
def space_dir(tmp_path) -> Path:
    folder = tmp_path / "space"
    folder.mkdir()
    (folder / "none.yaml").write_text(SPACE)
    return folder


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Path:
    """One MLflow store for the module's sweeps, so the baseline trains once and is reused."""
    return tmp_path_factory.mktemp("store")


def sweep_args(store: Path, space_dir: Path, glue_dir: str, *extra: str) -> list[str]:
    return [
        "method=none",
        *FAST,
        f"data.glue_dir={glue_dir}",
        f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db",
        f"train.checkpoint_dir={store}/ckpt",
        f"sweep.space_dir={space_dir}",
        *extra,
    ]


def load(storage: str, name: str = STUDY) -> optuna.Study:
    if "://" in storage:
        return optuna.load_study(study_name=name, storage=storage)
    backend = optuna.storages.journal.JournalFileBackend(storage)
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def parent_and_children(store: Path, storage: str, study: str = STUDY):
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("tokprune").experiment_id
    where = f"tags.role = 'sweep' and tags.study = '{study}' and tags.storage = '{storage}'"
    parents = client.search_runs([exp], where)
    assert len(parents) == 1, "exactly one parent run per study"
    parent = parents[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    return client, parent, children


def assert_consistent(study: optuna.Study, children, complete: int) -> None:
    """Nothing lost or duplicated: each complete trial has exactly one FINISHED child run, and back."""
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials))), "trial numbers are unique and dense"
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == complete
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    finished = {r.info.run_id: r for r in children if r.info.status == "FINISHED"}
    assert sorted(t.user_attrs["mlflow_run_id"] for t in done) == sorted(finished)
    for t in done:
        run = finished[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["trial"] == str(t.number)
        assert run.data.metrics["best/accuracy"] == pytest.approx(t.values[0])
        assert run.data.metrics["best/flops_ratio_real"] == pytest.approx(t.values[1])
        assert t.params and all(float(run.data.params[k]) == pytest.approx(v) for k, v in t.params.items())
    assert not [r for r in children if r.info.status == "RUNNING"]


# -- bad input: one line, exit 2, nothing trains -----------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be caught before anything trains")

    monkeypatch.setattr(sweep_module, "train", refuse)


def one_line_error(capsys, args) -> str:
    assert main(["sweep", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokprune: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("params:\n  train.lr: {distribution: gauss, low: 0.1, high: 1}\n", "unknown distribution 'gauss'"),
        ("params:\n  train.lr: {distribution: float, low: 1.0, high: 0.5}\n", "low (1.0) must be below high (0.5)"),
        ("params:\n  train.lr: {distribution: float, low: 0.1, high: 0.1}\n", "must be below high"),
        (
            "params:\n  train.lr: {distribution: float, low: 0.0, high: 1.0, log: true}\n",
            "a log distribution needs low > 0",
        ),
        ("params:\n  train.lr: {distribution: float, low: a, high: 1.0}\n", "low must be a number"),
        ("params:\n  train.lr: {distribution: float, low: 0.1}\n", "missing high"),
        ("params:\n  train.lr: {distribution: float, low: 0.1, high: 1, q: 2}\n", "unknown field(s) q"),
        ("params:\n  train.lr: {distribution: categorical, choices: []}\n", "choices must be a non-empty list"),
        (
            "params:\n  train.learning_rate: {distribution: float, low: 0.1, high: 1}\n",
            "train.learning_rate: unknown config key 'train.learning_rate'",
        ),
        ("params:\n  train: {distribution: float, low: 0.1, high: 1}\n", "is not a dotted config key"),
        ("params:\n  train.epochs: {distribution: float, low: 1, high: 3}\n", "holds an integer (1): use an int"),
        ("params:\n  train.deterministic: {distribution: categorical, choices: [1, 2]}\n", "is not true/false"),
        ("params: {}\n", "params must map at least one config key"),
        (
            "trials: {smoke: 0}\nparams:\n  train.lr: {distribution: float, low: 0.1, high: 1}\n",
            "trials.smoke must be a positive integer",
        ),
        ("trials: {tiny: 3}\nparams:\n  train.lr: {distribution: float, low: 0.1, high: 1}\n", "unknown budget 'tiny'"),
        (
            "trials: {cpu: 3}\nparams:\n  train.lr: {distribution: float, low: 0.1, high: 1}\n",
            "no trial count for budget 'smoke'",
        ),
        ("space:\n  train.lr: {distribution: float, low: 0.1, high: 1}\n", "unknown top-level key(s) space"),
        ("params: [oops\n", "not valid YAML"),
        (SPACE + "baseline_checkpoint: teacher\n", "baseline_checkpoint must be a dotted config key"),
        (SPACE + "baseline_checkpoint: method.teacher\n", "baseline_checkpoint: unknown config key 'method.teacher'"),
        (
            SPACE + "per_budget:\n  tiny: {params: {train.lr: {distribution: float, low: 0.1, high: 1}}}\n",
            "per_budget: unknown budget 'tiny'",
        ),
        (SPACE + "per_budget:\n  smoke: {trials: 3}\n", "per_budget.smoke must hold exactly one key, params"),
        (SPACE + "per_budget:\n  smoke: {params: {}}\n", "per_budget.smoke.params must map at least one"),
        (
            SPACE + "per_budget:\n  smoke: {params: {train.lr: {distribution: float, low: 2, high: 1}}}\n",
            "low (2.0) must be below high (1.0)",
        ),
        (
            SPACE + "per_budget:\n  smoke: {params: {train.nope: {distribution: float, low: 0.1, high: 1}}}\n",
            "unknown config key 'train.nope'",
        ),
    ],
)
def test_bad_search_space_is_one_line_exit_2(text, message, tmp_path, capsys, no_training):
    (tmp_path / "none.yaml").write_text(text)
    line = one_line_error(
        capsys,
        ["method=none", *FAST, f"sweep.space_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
    )
    assert message in line and str(tmp_path / "none.yaml") in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.journal").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["method=magic"], "unknown method 'magic': methods with a search space in"),
        (["method=future"], "method 'future' is not implemented yet"),
        (["sweep.trials=0"], "bad value for sweep.trials: 0 (expected null or an integer >= 1)"),
        (["sweep.trials=many"], "bad value for sweep.trials: 'many' (expected null or an integer >= 1)"),
        (["sweep.workers=0"], "bad value for sweep.workers: 0 (expected an integer >= 1)"),
        (["sweep.startup_trials=0"], "sweep.startup_trials must be an integer >= 1"),
        (["sweep.max_retry=-1"], "bad value for sweep.max_retry: -1 (expected an integer >= 0)"),
        (["sweep.nope=1"], "unknown config key 'sweep.nope'"),
        (["train.lr=1e-4"], "train.lr is searched by"),
        (
            ["sweep.storage=nosuchdb://x/y"],
            "storage 'nosuchdb://x/y': SQLAlchemy has no dialect 'nosuchdb'; give a journal",
        ),
        (["task=nope"], "unknown task 'nope'"),
        (["oops"], "bad argument 'oops'"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(extra, message, space_dir, tmp_path, capsys, no_training):
    (space_dir / "future.yaml").write_text("params:\n  method.knob: {distribution: float, low: 0.1, high: 1}\n")
    line = one_line_error(
        capsys,
        [
            "method=none",
            *FAST,
            f"sweep.space_dir={space_dir}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *extra,
        ],
    )
    assert message in line
    assert not (tmp_path / "mlflow.db").exists()


def test_a_method_without_a_search_space_is_named(tmp_path, capsys, no_training):
    line = one_line_error(capsys, ["method=none", f"sweep.space_dir={tmp_path}"])
    assert f"no search space for method 'none': write {tmp_path / 'none.yaml'}" in line


def test_the_command_line_path_exits_2_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "tokprune", "sweep", "method=magic"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tokprune: error: unknown method 'magic': methods with a search space in {ROOT / 'sweeps'}: "
        + ", ".join(sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
    ]


def test_every_method_search_space_in_the_repo_is_valid():
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert {"transkimmer", "gate", "top"} <= {f.stem for f in files}
    targets = set()
    for path in files:
        space = load_space(path, path.stem)  # structure, ranges, distributions
        assert {"smoke", "cpu", "full"} <= set(space.trials), f"{path}: a trial count for every budget"
        # protocol=shared: the one knob every method shares, over one range, plus the method's own fixed settings
        shared = {p.key: p for p in space.params}
        targets.add(shared.pop("protocol.target_flops"))
        assert all(p.key.startswith("method.") for p in shared.values()), f"{path}: the rest is the method's own"
        paper = space.per_protocol["paper"]
        assert all(p.key.startswith("method.") for p in paper.params), f"{path}: the paper's own knobs"
        implemented = path.stem in choices("method") and (ROOT / "tokprune" / "methods" / f"{path.stem}.py").is_file()
        if implemented:  # every key exists in the method's config and takes the range's values
            for protocol in ("shared", "paper"):
                plan = plan_sweep([f"method={path.stem}", "model=tiny", "budget=smoke", f"protocol={protocol}"])
                assert plan.target == space.trials["smoke"]
                assert plan.study_name.endswith(f"smoke{'-shared' if protocol == 'shared' else ''}-seed42")
                for budget in {*space.per_budget, *paper.per_budget}:  # and so do a budget's own ranges
                    assert (
                        plan_sweep(
                            [f"method={path.stem}", "model=tiny", f"budget={budget}", f"protocol={protocol}"]
                        ).space.per_budget
                        == {}
                    )
        else:
            with pytest.raises(UsageError, match=f"method '{path.stem}' is not implemented yet"):
                plan_sweep([f"method={path.stem}", "model=tiny", "budget=smoke"])
    assert len(targets) == 1, "every method sweeps protocol.target_flops over the same range"


def test_plan_names_the_study_and_puts_the_journal_beside_the_mlflow_store(space_dir, tmp_path):
    plan = plan_sweep(
        [
            "method=none",
            "model=tiny",
            "budget=smoke",
            "seed=7",
            f"sweep.space_dir={space_dir}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/m/mlflow.db",
            "sweep.trials=9",
            "train.epochs=2",
        ]
    )
    assert plan.study_name == "none-sst2-tiny-smoke-seed7"
    assert plan.storage == str(tmp_path / "m" / "optuna.journal") and not plan.is_rdb
    assert plan.target == 9 and plan.passthrough[-1] == "train.epochs=2"
    assert plan.result_overrides == ["train.epochs=2"]  # the seed is in the name; paths change no result
    assert plan.startup_trials == 3  # TPE models the front after a third of the 9 trials
    remote = plan_sweep(["method=none", f"sweep.space_dir={space_dir}", "sweep.storage=postgresql://u:secret@h/db"])
    assert remote.is_rdb and "secret" not in remote.storage_label and remote.target == 5  # `default` trials


def test_sampled_values_reach_the_trial_config_with_their_types(tmp_path):
    path = tmp_path / "none.yaml"
    path.write_text(
        "params:\n"
        "  train.epochs: {distribution: int, low: 1, high: 4}\n"
        "  train.deterministic: {distribution: categorical, choices: [true, false]}\n"
        "  train.gradient_clip_val: {distribution: float, low: 0.5, high: 2.0, step: 0.5}\n"
        "  train.lr: {distribution: float, low: 1.0e-6, high: 1.0e-5, log: true}\n"
    )
    space = load_space(path, "none")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        values = space.suggest(study.ask())
        cfg = compose(["model=tiny", *(override(k, v) for k, v in values.items())])
        assert isinstance(cfg.train.epochs, int) and 1 <= cfg.train.epochs <= 4
        assert isinstance(cfg.train.deterministic, bool)
        assert cfg.train.gradient_clip_val in (0.5, 1.0, 1.5, 2.0)
        assert cfg.train.lr == values["train.lr"] and 1e-6 <= cfg.train.lr <= 1e-5


def test_a_budget_replaces_and_adds_to_the_searched_ranges(tmp_path):
    (tmp_path / "none.yaml").write_text(
        SPACE + "per_budget:\n  cpu:\n    params:\n"
        "      train.lr: {distribution: float, low: 1.0e-4, high: 1.0e-3, log: true}\n"
        "      train.warmup_ratio: {distribution: categorical, choices: [0.0]}\n"
    )
    args = ["method=none", "model=tiny", f"sweep.space_dir={tmp_path}"]
    smoke = plan_sweep([*args, "budget=smoke"]).space.describe()
    cpu = plan_sweep([*args, "budget=cpu"]).space.describe()
    assert smoke == {"train.lr": "float [1e-05, 0.001] log"}
    assert cpu == {"train.lr": "float [0.0001, 0.001] log", "train.warmup_ratio": "categorical [0.0]"}


def test_the_transkimmer_cpu_sweep_places_trials_by_their_target_kept_fraction():
    shared = plan_sweep(["method=transkimmer", "budget=cpu"]).space.describe()  # protocol=shared: the FLOPs target
    assert shared == {
        "protocol.target_flops": "grid [0.5, 0.4, 0.45, 0.6, 0.3, 0.7, 0.35, 0.8]",
        "method.predictor_lr": "categorical [0.001]",
    }
    cpu = plan_sweep(["method=transkimmer", "budget=cpu", "protocol=paper"]).space.describe()
    full = plan_sweep(["method=transkimmer", "budget=full", "protocol=paper"]).space.describe()
    assert full == {"method.skim_lambda": "float [0.05, 2.0] log"}  # around the paper's 0.5
    assert cpu == {
        "method.skim_target": "float [0.2, 0.9]",
        "method.skim_target_mode": "categorical ['quadratic']",
        "method.skim_lambda": "categorical [5.0]",
        "method.skim_warmup": "categorical [0.3]",
        "method.predictor_lr": "categorical [0.001]",
    }


def test_a_grid_is_taken_in_its_order_one_trial_per_value_and_a_failed_value_again(tmp_path):
    (tmp_path / "none.yaml").write_text("params:\n  train.lr: {distribution: grid, values: [3.0e-4, 1.0e-4, 1.0e-3]}\n")
    args = ["method=none", *FAST, f"sweep.space_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    with pytest.raises(UsageError, match="a grid of 3 values, one trial each: ask for at most 3 trials, not 4"):
        plan_sweep([*args, "sweep.trials=4"])
    sweep = Sweep(plan_sweep([*args, "sweep.trials=3"]))
    optuna.create_study(study_name=STUDY, storage=sweep.storage, directions=["maximize", "minimize"])
    taken = []
    for outcome in (TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE):
        study = sweep.load()
        sweep.queue_grid_value(study)
        sweep.queue_grid_value(study)  # one queued value at a time
        assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
        trial = study.ask()
        taken.append(sweep.plan.space.suggest(trial)["train.lr"])
        study.tell(trial, [0.5, 0.5] if outcome == TrialState.COMPLETE else None, state=outcome)
    assert taken == [3e-4, 1e-4, 1e-4, 1e-3]  # listed order; the failed 1e-4 again, then the rest


def test_a_space_has_at_most_one_grid(tmp_path):
    path = tmp_path / "none.yaml"
    path.write_text(
        "params:\n  train.lr: {distribution: grid, values: [1.0e-4]}\n"
        "  train.epochs: {distribution: grid, values: [1, 2]}\n"
    )
    with pytest.raises(UsageError, match="at most one grid parameter, not train.lr, train.epochs"):
        load_space(path, "none")
    path.write_text("params:\n  train.lr: {distribution: grid, values: [1.0e-4, 1.0e-4]}\n")
    with pytest.raises(UsageError, match="grid values repeat"):
        load_space(path, "none")


# -- fast unit checks of the crash machinery ---------------------------------------------


def test_finite_loss_callback_fails_a_nan_step():
    class Trainer:
        global_step = 3

    FiniteLoss().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(0.7)}, None, 0)
    with pytest.raises(TrialFailed, match="training loss is nan at step 3"):
        FiniteLoss().on_train_batch_end(Trainer(), None, {"loss": torch.tensor(float("nan"))}, None, 0)


def test_a_dead_workers_trial_is_failed_and_requeued(space_dir, tmp_path):
    plan = plan_sweep(
        ["method=none", *FAST, f"sweep.space_dir={space_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    )
    sweep = Sweep(plan)
    sweep.exp_id = experiment_id(sweep.client, "tokprune", plan.tracking_uri)
    sweep.parent_id = sweep.client.create_run(sweep.exp_id).info.run_id
    study = optuna.create_study(study_name=STUDY, storage=sweep.storage, directions=["maximize", "minimize"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive, dead = study.ask(), study.ask()
    for trial, pid in ((alive, os.getpid()), (dead, gone.pid)):
        trial.suggest_float("train.lr", 1e-5, 1e-3, log=True)
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", pid)
    study.ask()  # no owner yet: its process died between ask and claim
    sweep.reap(study)
    states = [t.state for t in study.get_trials()]
    assert states[:3] == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]
    retry = study.get_trials()[3]
    assert retry.state == TrialState.WAITING and retry.params == study.get_trials()[1].params
    assert retry.system_attrs["failed_trial"] == 1


def test_the_sampler_models_the_front_after_the_startup_trials(space_dir, tmp_path):
    plan = plan_sweep(
        [
            "method=none",
            *FAST,
            f"sweep.space_dir={space_dir}",
            "sweep.startup_trials=2",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    sweep = Sweep(plan)
    optuna.create_study(study_name=STUDY, storage=sweep.storage, directions=["maximize", "minimize"])
    sampler = sweep.load().sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 2


def test_rdb_storage_drops_a_trial_beyond_the_total(space_dir, tmp_path):
    db = f"sqlite:///{tmp_path}/optuna.db"
    plan = plan_sweep(
        [
            "method=none",
            *FAST,
            f"sweep.space_dir={space_dir}",
            f"sweep.storage={db}",
            "sweep.trials=2",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    sweep = Sweep(plan)
    study = optuna.create_study(study_name=STUDY, storage=sweep.storage, directions=["maximize", "minimize"])
    first, second = study.ask(), study.ask()
    sweep.claim(first)
    sweep.claim(second)
    with pytest.raises(Surplus):
        sweep.claim(study.ask())
    assert first.user_attrs["pid"] == os.getpid() and first.user_attrs["host"] == socket.gethostname()


def test_a_pareto_sweep_keeps_the_checkpoints_of_the_front_and_of_the_timed_targets():
    """The report times each method's trial at report.timed_targets (off the front or not), so a
    sweep must not delete those checkpoints; other dominated trials' go."""
    grid = optuna.distributions.CategoricalDistribution([0.3, 0.5, 0.6])

    def trial(number, target=None):
        params, dists = ({"protocol.target_flops": target}, {"protocol.target_flops": grid}) if target else ({}, {})
        made = optuna.trial.create_trial(params=params, distributions=dists, values=[0.8, 0.5])
        made.number = number
        return made

    front = {0: "run0"}
    assert sweep_module.kept(trial(0, 0.3), front, [0.5])  # on the front
    assert sweep_module.kept(trial(1, 0.5), front, [0.5])  # dominated, but the report times it
    assert not sweep_module.kept(trial(2, 0.6), front, [0.5])
    assert not sweep_module.kept(trial(3), front, [0.5])  # a study that does not sweep the target
    assert sweep_module.kept(trial(2, 0.6), front, [0.5, 0.6])
    assert not sweep_module.kept(trial(1, 0.5), front, [])


# -- real sweeps ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_sweep_logs_study_parent_children_and_pareto_tags(space_dir, glue_dir, tmp_path, capsys):
    assert main(["sweep", *sweep_args(tmp_path, space_dir, glue_dir)]) == 0
    out = capsys.readouterr().out
    journal = tmp_path / "optuna.journal"  # the default storage: beside mlflow.db
    study = load(str(journal))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3  # smoke default of the space file
    client, parent, children = parent_and_children(tmp_path, str(journal))
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.tags[k] for k in ("method", "task", "model", "budget", "study", "storage")} == {
        "method": "none",
        "task": "sst2",
        "model": "tiny",
        "budget": "smoke",
        "study": STUDY,
        "storage": str(journal),
    }
    assert len(children) == 3
    assert_consistent(study, children, complete=3)
    front = {t.number for t in study.best_trials}
    assert front and {int(r.data.tags["trial"]) for r in children if r.data.tags["pareto"] == "true"} == front
    assert {r.data.tags["pareto"] for r in children if int(r.data.tags["trial"]) not in front} <= {"false"}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):  # sweep.keep_checkpoints=pareto (default)
        assert Path(trial.user_attrs["checkpoint"]).is_file() == (trial.number in front)
    assert len(front) < 3 and "deleted the checkpoints of dominated trials" in out
    assert all("sampled.train.lr" in r.data.params for r in children)
    assert all(r.data.tags["mlflow.runName"] == f"{STUDY}-trial{r.data.tags['trial']}" for r in children)
    assert all(client.get_metric_history(r.info.run_id, "train/flops") for r in children)  # per-step curves
    # the unpruned baseline: trained once, found by tags, recorded on the parent
    exp = parent.info.experiment_id
    baselines = client.search_runs([exp], "tags.role = 'baseline'")
    assert len(baselines) == 1 and baselines[0].data.params["method.name"] == "none"
    assert parent.data.tags["baseline_run_id"] == baselines[0].info.run_id
    assert Path(parent.data.tags["baseline_checkpoint"]).is_file()
    assert parent.data.metrics["baseline/accuracy"] == baselines[0].data.metrics["best/accuracy"]
    assert parent.data.metrics["baseline/flops_ratio_real"] == pytest.approx(1.0)
    assert parent.data.tags["pareto_trials"] == ",".join(map(str, sorted(front)))
    table = Path(client.download_artifacts(parent.info.run_id, "sweep/trials.csv", str(tmp_path / "dl")))
    rows = table.read_text().splitlines()
    assert rows[0].startswith("trial,state,pareto,accuracy,flops_ratio_real") and len(rows) == 1 + 1 + 3
    # progress for the user: which trial of how many, the front, where the store is
    assert "trial 2 started (3 of 3)" in out and out.count("Pareto front, 3/3 trials complete") == 1  # not twice
    assert f"MLflow store sqlite:///{tmp_path}/mlflow.db" in out
    # the same study name started afresh (its journal deleted) gets a parent run of its own
    journal.unlink()
    assert main(["sweep", *sweep_args(tmp_path, space_dir, glue_dir), "sweep.trials=1"]) == 0
    parents = client.search_runs([exp], "tags.role = 'sweep'")
    new = [p for p in parents if p.info.run_id != parent.info.run_id]
    assert len(parents) == 2 and new[0].data.tags["sweep_id"] == load(str(journal)).user_attrs["sweep_id"]
    assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{new[0].info.run_id}'")) == 1
    assert len(client.search_runs([exp], "tags.role = 'baseline'")) == 1  # reused, not retrained


@pytest.mark.slow
def test_resume_runs_only_the_missing_trials(space_dir, glue_dir, shared_store, tmp_path, capsys):
    journal = str(tmp_path / "resume.journal")
    args = sweep_args(shared_store, space_dir, glue_dir, f"sweep.storage={journal}")
    assert main(["sweep", *args, "sweep.trials=2"]) == 0
    first = {t.number: t.user_attrs["mlflow_run_id"] for t in load(journal).get_trials()}
    assert main(["sweep", *args, "sweep.trials=4"]) == 0
    assert "study none-sst2-tiny-smoke-seed42: 2/4 trials complete" in capsys.readouterr().out
    study = load(journal)
    _, _, children = parent_and_children(shared_store, storage=journal)  # one parent, reused
    assert_consistent(study, children, complete=4)
    assert len(study.get_trials()) == 4 and len(children) == 4
    assert {t.number: t.user_attrs["mlflow_run_id"] for t in study.get_trials()[:2]} == first
    assert main(["sweep", *args, "sweep.trials=4"]) == 0  # nothing left to do
    assert len(load(journal).get_trials()) == 4


@pytest.mark.slow
def test_a_sweep_resumes_on_a_new_store_from_its_report(space_dir, glue_dir, tmp_path, capsys):
    """sweep.resume_from: the study's complete trials come from the report.json of a store that
    is gone, keep their numbers, values and speedups, and only the missing trials train."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["sweep", *sweep_args(first, space_dir, glue_dir), "sweep.trials=3"]) == 0
    report = first / "reports" / "sst2" / "report.json"
    data = json.loads(report.read_text())
    [method] = data["methods"]
    method["points"] = [p for p in method["points"] if p["trial"] != 1]  # as if trial 1 had failed there
    report.write_text(json.dumps(data))
    recorded = {p["trial"]: p for p in method["points"]}
    capsys.readouterr()

    args = sweep_args(second, space_dir, glue_dir, f"sweep.resume_from={report}")
    assert main(["sweep", *args, "sweep.trials=3"]) == 0
    out = capsys.readouterr().out
    assert f"resumed 2 complete trial(s) of 3 from sst2/report.json of {data['generated']}" in out
    study = load(str(second / "optuna.journal"))
    trials = study.get_trials()
    assert [(t.number, t.state) for t in trials] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.FAIL),
        (2, TrialState.COMPLETE),
        (3, TrialState.COMPLETE),
    ]
    for number in (0, 2):
        t, p = trials[number], recorded[number]
        assert (t.values, t.params, t.user_attrs["mlflow_run_id"]) == (
            [p["metric"], p["flops_real"]],
            p["params"],
            p["run_id"],
        )
    _, _, children = parent_and_children(second, str(second / "optuna.journal"))
    assert [r.data.tags["trial"] for r in children] == ["3"]  # only the missing trial trained here
    joined = json.loads((second / "reports" / "sst2" / "report.json").read_text())
    [resumed] = joined["methods"]
    assert resumed["resumed_trials"] == [0, 2] and resumed["carried_from"] == ""
    for number, speedup in method["speedup"].items():  # measured there, kept as recorded
        if int(number) in (0, 2) and str(number) in resumed["speedup"]:
            assert resumed["speedup"][str(number)] == speedup
    assert (
        "(sweep.resume_from), as recorded there, points and speedups: none trials 0, 2."
        in (second / "reports" / "sst2" / "pareto.md").read_text()
    )
    # the same command again: the study has its trials, the report is not read again
    assert main(["sweep", *args, "sweep.trials=3"]) == 0
    assert (
        "sweep.resume_from: not used, study none-sst2-tiny-smoke-seed42 already has trials" in capsys.readouterr().out
    )
    assert len(load(str(second / "optuna.journal")).get_trials()) == 4


def test_a_report_that_cannot_resume_the_study_is_one_line_exit_2(space_dir, tmp_path, capsys, no_training):
    point = {
        "trial": 0,
        "params": {"train.lr": 1e-4},
        "metric": 0.8,
        "flops_real": 1.0,
        "flops_padded": 0.5,
        "kept": [1.0, 1.0],
        "run_id": None,
        "pareto": True,
    }

    def report(name, study=STUDY, **point_changes):
        path = tmp_path / f"{name}.json"
        path.write_text(
            json.dumps(
                {
                    "task": "sst2",
                    "model": "tiny",
                    "budget": "smoke",
                    "seed": 42,
                    "methods": [
                        {
                            "method": "none",
                            "label": "none",
                            "study": study,
                            "parent_run_id": None,
                            "overrides": [],
                            "points": [{**point, **point_changes}],
                            "baseline": None,
                            "speedup": {},
                        }
                    ],
                }
            )
        )
        return path

    args = ["method=none", *FAST, f"sweep.space_dir={space_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    for path, message in [
        (report("other", study="another-study"), "it records no study none-sst2-tiny-smoke-seed42"),
        (report("params", params={"train.wd": 0.1}), "trial 0 has parameters ['train.wd'], this sweep's space"),
        (report("range", params={"train.lr": 0.5}), "trial 0 does not fit this sweep's space"),
        (tmp_path / "missing.json", "cannot read it as a report.json (FileNotFoundError)"),
    ]:
        line = one_line_error(capsys, [*args, f"sweep.resume_from={path}"])
        assert f"sweep.resume_from={path}: {message}" in line, line
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store opens
    # the first reports (no date, one bench row as "speedup") still resume; that row is not read
    legacy = report("legacy", params={"train.lr": 2e-4})
    data = json.loads(legacy.read_text())
    data["methods"][0]["points"][0]["trial"] = 1
    data["methods"][0]["speedup"] = {"trial": 1, "batch_size": 1, "wall_speedup": 1.5}
    legacy.write_text(json.dumps(data))
    origin, trials = sweep_module.resumed_trials(plan_sweep([*args, f"sweep.resume_from={legacy}"]))
    assert origin == portable(str(legacy))  # its last two folders, no date
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == {"train.lr": 2e-4} and trials[1].values == [0.8, 1.0]
    assert "speedup" not in trials[1].user_attrs and trials[1].user_attrs["best/kept_fraction/layer_1"] == 1.0


def sweep_with_two_workers(storage, shared_store, space_dir, glue_dir):
    """A 4-trial sweep by two worker processes on one storage: (study, parent run, child runs, stdout)."""
    args = sweep_args(
        shared_store, space_dir, glue_dir, f"sweep.storage={storage}", "sweep.trials=4", "sweep.workers=2"
    )
    result = subprocess.run(
        [sys.executable, "-m", "tokprune", "sweep", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, parent, children = parent_and_children(shared_store, storage=storage)
    return load(storage), parent, children, result.stdout


@pytest.mark.slow
def test_two_workers_on_one_journal_make_exactly_the_total(space_dir, glue_dir, shared_store, tmp_path):
    study, parent, children, stdout = sweep_with_two_workers(
        str(tmp_path / "two.journal"), shared_store, space_dir, glue_dir
    )
    assert_consistent(study, children, complete=4)
    assert len(study.get_trials()) == 4
    assert len({t.user_attrs["pid"] for t in study.get_trials()}) == 2, "both workers ran trials"
    assert "[sweep worker 1]" in stdout and "[sweep worker 2]" in stdout
    assert parent.info.status == "FINISHED" and "pareto_trials" in parent.data.tags


# One 200-step epoch (~7 s on the tiny model): long enough that a signal sent after the first
# logged step cannot arrive after the trial has finished.
LONG_TRIAL = ["data.train_subset=3200", "train.max_steps=200"]


def start_sweep(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tokprune", "sweep", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )


def wait_for_running_trial(proc, storage: str, number: int, log: Path, store: Path, timeout: float = 400):
    """Until trial ``number`` is RUNNING and its MLflow run has logged a training step: with
    LONG_TRIAL's settings a signal sent then lands mid-training, never after the trial ended."""
    deadline = time.monotonic() + timeout
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            trials = load(storage).get_trials()
        except Exception:  # the study may not exist yet
            trials = []
        if (
            len(trials) > number
            and trials[number].state == TrialState.RUNNING
            and trials[number].user_attrs.get("mlflow_run_id")
        ):
            if client.get_metric_history(trials[number].user_attrs["mlflow_run_id"], "train/loss"):
                return trials[number]
        time.sleep(0.2)
    raise AssertionError(f"the sweep never reached trial {number}: {log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "rdb"])
def test_kill_9_then_rerun_loses_and_duplicates_nothing(kind, space_dir, glue_dir, shared_store, tmp_path):
    storage = str(tmp_path / "k.journal") if kind == "journal" else f"sqlite:///{tmp_path}/k.db"
    args = sweep_args(
        shared_store,
        space_dir,
        glue_dir,
        f"sweep.storage={storage}",
        "sweep.trials=2",
        "sweep.heartbeat_interval=1",
        "sweep.grace_period=2",
        "sweep.poll_seconds=1",
        *LONG_TRIAL,
    )
    proc = start_sweep(args, tmp_path / "log.txt")
    killed = wait_for_running_trial(proc, storage, 1, tmp_path / "log.txt", store=shared_store)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    client = MlflowClient(f"sqlite:///{shared_store}/mlflow.db")
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # left open by the crash
    before = load(storage).get_trials()[0]
    assert before.state == TrialState.COMPLETE

    assert main(["sweep", *args]) == 0
    study = load(storage)
    _, _, children = parent_and_children(shared_store, storage=storage)
    assert_consistent(study, children, complete=2)
    trials = study.get_trials()
    assert trials[0].user_attrs["mlflow_run_id"] == before.user_attrs["mlflow_run_id"]  # not lost, not re-run
    assert trials[1].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == killed.params
    assert len(trials) == 3
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_marks_the_running_trial_failed(signum, space_dir, glue_dir, shared_store, tmp_path):
    storage = str(tmp_path / "i.journal")
    args = sweep_args(shared_store, space_dir, glue_dir, f"sweep.storage={storage}", "sweep.trials=3", *LONG_TRIAL)
    proc = start_sweep(args, tmp_path / "log.txt")
    running = wait_for_running_trial(proc, storage, 0, tmp_path / "log.txt", store=shared_store)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 128 + signum, (tmp_path / "log.txt").read_text()[-3000:]
    trial = load(storage).get_trials()[0]
    assert trial.state == TrialState.FAIL and len(load(storage).get_trials()) == 1
    client, parent, _ = parent_and_children(shared_store, storage=storage)
    assert client.get_run(running.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert parent.info.status == "KILLED"
    assert "run the same command to resume" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_failing_trials_are_marked_failed_and_the_sweep_goes_on(
    space_dir, glue_dir, shared_store, tmp_path, monkeypatch
):
    real_train = sweep_module.train

    class Boom(Exception):
        pass

    import lightning as L

    class RaiseAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            raise Boom("injected failure")

    def flaky_train(cfg, callbacks=None, tags=None):
        trial = (tags or {}).get("trial")
        if trial == "0":
            cfg.train.lr = 1e30  # weights blow up: the loss turns NaN
        if trial == "1":
            callbacks = [*callbacks, RaiseAtStart()]
        return real_train(cfg, callbacks=callbacks, tags=tags)

    monkeypatch.setattr(sweep_module, "train", flaky_train)
    storage = str(tmp_path / "f.journal")
    assert main(["sweep", *sweep_args(shared_store, space_dir, glue_dir, f"sweep.storage={storage}")]) == 0
    study = load(storage)
    client, _, children = parent_and_children(shared_store, storage=storage)
    assert_consistent(study, children, complete=3)
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL] and len(trials) == 5
    assert "training loss is nan" in trials[0].user_attrs["error"]
    assert "injected failure" in trials[1].user_attrs["error"]
    for t in trials[:2]:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["pareto"] == "false"


@pytest.mark.slow
def test_a_worker_gives_up_after_too_many_failures_in_a_row(
    space_dir, glue_dir, shared_store, tmp_path, monkeypatch, capsys
):
    real_train = sweep_module.train

    def broken(cfg, callbacks=None, tags=None):
        if (tags or {}).get("role") == "trial":
            raise RuntimeError("always broken")
        return real_train(cfg, callbacks=callbacks, tags=tags)

    monkeypatch.setattr(sweep_module, "train", broken)
    storage = str(tmp_path / "b.journal")
    args = sweep_args(shared_store, space_dir, glue_dir, f"sweep.storage={storage}", "sweep.max_failures=2")
    assert main(["sweep", *args]) == 1
    assert [t.state for t in load(storage).get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert "stopping: 2 trials in a row failed" in capsys.readouterr().out


@pytest.mark.slow
def test_trials_get_the_baseline_checkpoint_when_the_space_asks(glue_dir, shared_store, tmp_path):
    (tmp_path / "transkimmer.yaml").write_text(
        "params:\n  method.skim_lambda: {distribution: float, low: 0.05, high: 2.0, log: true}\n"
        "baseline_checkpoint: method.init_checkpoint\n"
    )
    storage = str(tmp_path / "t.journal")
    args = sweep_args(shared_store, tmp_path, glue_dir, f"sweep.storage={storage}", "sweep.trials=1")
    args = [*(a.replace("method=none", "method=transkimmer") for a in args), "protocol=paper"]  # its own start key
    assert main(["sweep", *args]) == 0
    study = load(storage, "transkimmer-sst2-tiny-smoke-seed42")
    _, parent, children = parent_and_children(shared_store, storage, study="transkimmer-sst2-tiny-smoke-seed42")
    assert_consistent(study, children, complete=1)
    assert children[0].data.params["method.init_checkpoint"] == parent.data.tags["baseline_checkpoint"]
    assert Path(parent.data.tags["baseline_checkpoint"]).is_file()


# -- PostgreSQL: workers sharing one study through a database -------------------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (initdb/pg_ctl not found)")
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver for SQLAlchemy (pip install psycopg2-binary)")
    data = Path(tempfile.mkdtemp(prefix="tokprune-pg-"))
    run_as = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(data, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [*run_as, initdb, "-D", str(data / "db"), "-U", "postgres", "--auth=trust"], check=True, capture_output=True
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data / "db"),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(postgres_url, space_dir, glue_dir, shared_store):
    study, _, children, _ = sweep_with_two_workers(postgres_url, shared_store, space_dir, glue_dir)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4 and not study.get_trials(states=(TrialState.RUNNING,))
    assert len({t.number for t in study.get_trials()}) == len(study.get_trials())
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.info.run_id for r in finished) == sorted(t.user_attrs["mlflow_run_id"] for t in done)


def test_the_baseline_is_found_or_trained_outside_the_study_gate(space_dir, tmp_path, monkeypatch):
    import fcntl
    from types import SimpleNamespace

    args = ["method=none", *FAST, f"sweep.space_dir={space_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    seen = {}

    def lock_is(path: str) -> str:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return "free"
        except BlockingIOError:
            return "held"
        finally:
            os.close(fd)

    def find_or_train(cfg, *rest):  # what another process would see while the baseline trains
        seen["study gate"] = lock_is(str(tmp_path / "optuna.journal.sweep-lock"))
        seen["baseline lock"] = lock_is(str(tmp_path / "optuna.journal.baseline-sst2-tiny-smoke-seed42.lock"))
        return SimpleNamespace(
            info=SimpleNamespace(run_id="b" * 32), data=SimpleNamespace(metrics={}, tags={"checkpoint": ""})
        )

    monkeypatch.setattr(sweep_module, "find_or_train", find_or_train)
    Sweep(plan_sweep(args)).setup()
    assert seen == {"study gate": "free", "baseline lock": "held"}


def test_a_study_started_with_other_result_overrides_is_not_mixed(space_dir, tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    args = ["method=none", *FAST, f"sweep.space_dir={space_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    run = SimpleNamespace(info=SimpleNamespace(run_id="b" * 32), data=SimpleNamespace(metrics={}, tags={}))
    monkeypatch.setattr(sweep_module, "find_or_train", lambda *a: run)
    Sweep(plan_sweep(args)).setup()
    capsys.readouterr()
    assert main(["sweep", *args, "train.weight_decay=0.1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the MLflow store's own log lines
    assert line.startswith(f"tokprune: error: study {STUDY} was started with overrides") and "sweep.study_name=" in line


def test_a_resumed_study_takes_a_reordered_grid_and_refuses_a_changed_one(tmp_path, capsys, monkeypatch):
    """Optuna fails every trial whose categorical list differs from the study's, even only in
    order: a reordered grid keeps the file's trial order and samples from the study's list."""
    from types import SimpleNamespace

    def grid(values: str) -> None:
        (tmp_path / "none.yaml").write_text(f"params:\n  train.lr: {{distribution: grid, values: [{values}]}}\n")

    args = ["method=none", *FAST, f"sweep.space_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    run = SimpleNamespace(info=SimpleNamespace(run_id="b" * 32), data=SimpleNamespace(metrics={}, tags={}))
    monkeypatch.setattr(sweep_module, "find_or_train", lambda *a: run)

    def next_value(sweep: Sweep) -> float:
        study = sweep.setup()
        sweep.queue_grid_value(study)
        trial = study.ask()
        value = sweep.plan.space.suggest(trial)["train.lr"]
        study.tell(trial, [0.5, 0.5])
        return value

    grid("3.0e-4, 1.0e-4, 1.0e-3")
    assert next_value(Sweep(plan_sweep([*args, "sweep.trials=3"]))) == 3e-4
    grid("3.0e-4, 1.0e-3, 1.0e-4")
    reordered = plan_sweep([*args, "sweep.trials=3"])
    study = Sweep(reordered).setup()
    trial = study.ask()
    with pytest.raises(ValueError, match="dynamic value space"):  # what Optuna does with the file's list
        reordered.space.suggest(trial)
    study.tell(trial, state=TrialState.FAIL)  # not left RUNNING (a reaper would re-queue it without a value)
    assert next_value(Sweep(reordered)) == 1e-3  # the file's new order
    grid("3.0e-4, 1.0e-4, 3.0e-3")
    capsys.readouterr()
    assert main(["sweep", *args, "sweep.trials=3"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"tokprune: error: study {STUDY} sampled train.lr from CategoricalDistribution(")
    assert line.endswith(
        "now gives grid [0.0003, 0.0001, 0.003]: name another study for the new space (sweep.study_name=...)"
    )


def test_a_worker_gives_up_when_trials_fail_before_training(space_dir, tmp_path, monkeypatch, capsys):
    """A trial that fails before it trains (here: sampling) counts toward sweep.max_failures; it
    once left the count untouched, and a worker spun through thousands of failed trials."""
    from types import SimpleNamespace

    from tokprune.search.plan import SearchSpace

    calls = []

    def broken(self, trial):
        calls.append(trial.number)
        if len(calls) > 10:
            pytest.fail("the worker did not stop after sweep.max_failures=3")  # not a hang when this regresses
        raise ValueError("CategoricalDistribution does not support dynamic value space.")

    storage = str(tmp_path / "b.journal")
    args = ["method=none", *FAST, f"sweep.space_dir={space_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    run = SimpleNamespace(info=SimpleNamespace(run_id="b" * 32), data=SimpleNamespace(metrics={}, tags={}))
    monkeypatch.setattr(sweep_module, "find_or_train", lambda *a: run)
    monkeypatch.setattr(SearchSpace, "suggest", broken)
    sweep = Sweep(plan_sweep([*args, f"sweep.storage={storage}", "sweep.max_failures=3"]))
    sweep.setup()
    assert sweep.run_trials() == 1
    assert [t.state for t in load(storage).get_trials()] == [TrialState.FAIL] * 3
    assert "stopping: 3 trials in a row failed" in capsys.readouterr().out
