"""Seed repeats of a sweep trial: same settings, other seeds, recorded in the study and shown as
mean +- std in the report."""

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from tokprune.cli import main
from tokprune.reporting.render import gap_against
from tokprune.search.results import Point

from conftest import GLUE, QQP_SAMPLE

SPACE = (
    "trials: {smoke: 2}\nparams:\n  train.lr: {distribution: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
    "  protocol.target_flops: {distribution: grid, values: [0.5, 0.4]}\n"
)


def point(metric: float, repeats=(), trial: int = 0) -> Point:
    return Point(
        trial=trial,
        params={},
        metric=metric,
        flops_real=0.5,
        flops_padded=0.2,
        kept=[],
        run_id=None,
        pareto=True,
        repeats=[{"seed": 43 + i, "metric": m} for i, m in enumerate(repeats)],
    )


def test_a_repeated_point_reads_as_mean_and_std_and_gaps_are_judged_against_the_spread():
    one, three = point(0.80), point(0.80, [0.82, 0.84])
    assert one.metric_cell() == "0.8000" and one.metric_std == 0.0
    assert three.metric_cell() == "0.8200 +- 0.0200 (3 seeds)"
    assert gap_against(three, one) == "+0.0200 (one seed)"
    close, far = point(0.815, [0.825, 0.835]), point(0.70, [0.71, 0.69])
    assert gap_against(three, close) == "-0.0050 (within 2 SE 0.0258)"  # 2 sqrt(0.02^2 / 3 + 0.01^2 / 3)
    assert gap_against(three, far).startswith("+0.1200 (> 2 SE")
    assert gap_against(three, None) == "—"


@pytest.mark.slow
def test_repeat_trains_a_trials_settings_with_more_seeds_as_child_runs_and_the_report_shows_the_spread(
    tmp_path, capsys
):
    if not GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE}")
    (tmp_path / "space").mkdir()
    (tmp_path / "space" / "none.yaml").write_text(SPACE)
    args = [
        "method=none",
        "task=sst2",
        "model=tiny",
        "budget=smoke",
        f"data.glue_dir={GLUE}:{QQP_SAMPLE}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"train.checkpoint_dir={tmp_path}/ckpt",
        f"sweep.space_dir={tmp_path}/space",
        "report.speedup_examples=0",
        "sweep.trials=1",
    ]
    assert main(["sweep", *args]) == 0
    assert main(["repeat", "trial=0", "seeds=2", *args]) == 0
    capsys.readouterr()
    assert main(["repeat", "target=0.45", "seeds=2", *args]) == 0  # both seeds done: nothing trains again
    assert "trial 0 (its protocol.target_flops=0.5) is the complete trial nearest 0.45: none trained" in (
        capsys.readouterr().out
    )
    study = optuna.load_study(
        study_name="none-sst2-tiny-smoke-seed42",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))),
    )
    records = study.user_attrs["repeats"]["0"]
    assert [r["seed"] for r in records] == [43, 44]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], "tags.role = 'repeat' and tags.repeat_of = '0'"
    )
    assert sorted(r.data.tags["seed"] for r in runs) == ["43", "44"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED" for r in runs)
    trial = study.trials[0]
    assert all(
        r.data.params["train.lr"] == repr(trial.params["train.lr"])
        or float(r.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        for r in runs
    )
    assert main(["report", *args]) == 0
    data = json.loads((tmp_path / "reports" / "sst2" / "report.json").read_text())
    [saved] = data["methods"]
    assert [r["seed"] for r in saved["points"][0]["repeats"]] == [43, 44]
    text = (tmp_path / "reports" / "sst2" / "report.json").read_text()
    assert str(tmp_path) not in text  # no machine path in a report: repeats' checkpoints as their last parts
    assert all(r["checkpoint"].endswith("best.ckpt") for r in saved["points"][0]["repeats"])
    assert "(3 seeds)" in (tmp_path / "reports" / "sst2" / "pareto.md").read_text()
    assert main(["repeat", "trial=5", "seeds=1", *args]) == 2  # no such trial: a one-line error


def test_target_names_the_complete_trial_nearest_that_flops_target():
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from tokprune.errors import UsageError
    from tokprune.search.repeat import trial_at_target

    study = optuna.create_study(directions=["maximize", "minimize"])
    grid = FloatDistribution(0.1, 0.9)
    for target, state in ((0.4, TrialState.COMPLETE), (0.5, TrialState.FAIL), (0.6, TrialState.COMPLETE)):
        study.add_trial(
            create_trial(
                params={"protocol.target_flops": target},
                distributions={"protocol.target_flops": grid},
                values=[0.8, target] if state == TrialState.COMPLETE else None,
                state=state,
            )
        )
    study.add_trial(
        create_trial(
            params={"protocol.target_flops": 0.5}, distributions={"protocol.target_flops": grid}, values=[0.8, 0.5]
        )
    )
    assert trial_at_target(study, 0.5) == 3  # the complete one, not the failed trial 1
    assert trial_at_target(study, 0.42) == 0
    assert (trial_at_target(study, 0.53), trial_at_target(study, 0.57)) == (3, 2)
    untargeted = optuna.create_study(directions=["maximize", "minimize"])
    untargeted.add_trial(create_trial(params={}, distributions={}, values=[0.8, 0.5]))
    with pytest.raises(UsageError, match="no complete trial with a protocol.target_flops"):
        trial_at_target(untargeted, 0.5)


@pytest.mark.parametrize(
    "words, message",
    [
        (["seeds=2"], "one of trial=N or target=X"),
        (["trial=0", "target=0.5", "seeds=2"], "one of trial=N or target=X"),
        (["target=half", "seeds=2"], "target=half: expected a number"),
        (["target=nan", "seeds=2"], "target=nan: expected a FLOPs ratio in (0, 1]"),
        (["target=1.5", "seeds=2"], "target=1.5: expected a FLOPs ratio in (0, 1]"),
        (["trial=0"], "repeat needs seeds=K"),
    ],
)
def test_repeat_names_a_bad_choice_of_trial_in_one_line(words, message, capsys):
    assert main(["repeat", *words, "method=top", "task=sst2", "budget=smoke", "model=tiny"]) == 2
    assert message in capsys.readouterr().err
