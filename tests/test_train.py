"""End to end: `train method=none budget=smoke` on real GLUE rows, read back from MLflow."""

import pytest
from mlflow.tracking import MlflowClient

from tokprune.config import compose
from tokprune.training.train import train

pytestmark = pytest.mark.slow


def smoke(task: str, glue_dir: str, uri: str, tmp_path, *extra: str):
    cfg = compose(
        [
            f"task={task}",
            "budget=smoke",
            f"mlflow.tracking_uri={uri}",
            f"data.glue_dir={glue_dir}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            *extra,
        ]
    )
    return cfg, train(cfg)


@pytest.mark.parametrize(
    "task, metrics",
    [
        ("sst2", {"accuracy"}),  # single sentence
        ("mrpc", {"f1", "accuracy"}),  # pairs
        ("stsb", {"pearson", "spearman"}),  # regression
    ],
)
def test_smoke_run_logs_params_and_metrics_to_mlflow(task, metrics, glue_dir, mlflow_uri, tmp_path):
    cfg, result = smoke(task, glue_dir, mlflow_uri, tmp_path)
    assert result.steps == 4 and result.train_rows == 64
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["task.name"] == task and run.data.params["method.name"] == "none"
    assert run.data.tags["budget"] == "smoke"
    logged = run.data.metrics
    assert "train/loss" in logged and "val/loss" in logged
    for name in metrics:
        assert f"val/{name}" in logged and f"best/{name}" in logged
    assert (tmp_path / "ckpt" / result.run_id / "best.ckpt").is_file()
    assert run.data.tags["checkpoint"] == str(tmp_path / "ckpt" / result.run_id / "best.ckpt")


def test_same_seed_gives_the_same_numbers(glue_dir, mlflow_uri, tmp_path):
    _, a = smoke("sst2", glue_dir, mlflow_uri, tmp_path)
    _, b = smoke("sst2", glue_dir, mlflow_uri, tmp_path)
    client = MlflowClient(mlflow_uri)
    losses = [[m.value for m in client.get_metric_history(r.run_id, "train/loss")] for r in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert a.best == b.best


def test_every_run_carries_the_common_tags_the_main_metric_and_its_data_as_dataset_inputs(
    glue_dir, mlflow_uri, tmp_path
):
    from tokprune.training.tracking import runs_view

    _, baseline = smoke("mrpc", glue_dir, mlflow_uri, tmp_path)
    cfg, result = smoke("mrpc", glue_dir, mlflow_uri, tmp_path, "method=static", "model=minilm")
    client = MlflowClient(mlflow_uri)
    for run_id, method, role, protocol in (
        (baseline.run_id, "none", "baseline", "-"),
        (result.run_id, "static", "train", "shared"),
    ):
        run = client.get_run(run_id)
        tags = run.data.tags
        assert {k: tags[k] for k in ("method", "task", "budget", "seed", "protocol", "role")} == {
            "method": method,
            "task": "mrpc",
            "budget": "smoke",
            "seed": "42",
            "protocol": protocol,
            "role": role,
        }
        assert run.data.metrics["best/main"] == run.data.metrics["best/f1"]  # MRPC's main metric
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"mrpc/train", "mrpc/dev"}
        assert '"rows": 64' in inputs["mrpc/train"].dataset.profile
    experiment = client.get_run(result.run_id).info.experiment_id
    assert f"/#/experiments/{experiment}/runs" in runs_view(mlflow_uri)


def test_a_failed_run_is_closed_through_a_busy_store_or_left_to_the_reaper_with_one_line(capsys):
    """A SIGTERM once exited 1 with a traceback: closing the run hit SQLite's "database is
    locked" on a loaded machine, and that error replaced the signal's."""
    from mlflow.exceptions import MlflowException

    from tokprune.training.tracking import mark_failed

    class BusyStore:
        run_id = "r" * 32

        def __init__(self, busy: int):
            self.busy, self.calls = busy, []

        def finalize(self, status: str) -> None:
            self.calls.append(status)
            if len(self.calls) <= self.busy:
                raise MlflowException("(sqlite3.OperationalError) database is locked\n[SQL: UPDATE runs ...]")

    briefly = BusyStore(busy=2)
    mark_failed(briefly, waits=(0.0, 0.0, 0.0))
    assert briefly.calls == ["failed"] * 3 and capsys.readouterr().err == ""
    stuck = BusyStore(busy=10)
    mark_failed(stuck, waits=(0.0, 0.0))  # returns: the caller re-raises what stopped training
    assert len(stuck.calls) == 3
    assert capsys.readouterr().err == (
        f"tokprune: warning: MLflow run {'r' * 32} could not be marked FAILED ((sqlite3.OperationalError) "
        "database is locked); the next command on this store marks it\n"
    )
