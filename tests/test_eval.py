"""`eval`: the checkpoint file alone reproduces its training run's dev numbers in hard mode,
logs an eval run beside the training run when the store is there, and never needs MLflow."""

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tokprune.cli import main
from tokprune.config import compose
from tokprune.serving.evaluate import evaluate, summary
from tokprune.training.train import train

from conftest import GLUE

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Trained:
    checkpoint: Path
    tracking_uri: str
    run_id: str
    best: dict[str, float]  # the run's best/* metrics, as logged in MLflow


@functools.cache
def trained(task: str, root: Path) -> Trained:
    """One `method=none budget=smoke` run per task and test session (test_predict.py shares
    them), each with its own MLflow store."""
    folder = root / f"smoke-{task}"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = train(
        compose(
            [
                f"task={task}",
                "budget=smoke",
                f"mlflow.tracking_uri={uri}",
                f"data.glue_dir={GLUE}",
                f"train.checkpoint_dir={folder / 'ckpt'}",
            ]
        )
    )
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    return Trained(
        Path(result.checkpoint), uri, result.run_id, {k: v for k, v in metrics.items() if k.startswith("best/")}
    )


@pytest.fixture(scope="module")
def sst2(tmp_path_factory) -> Trained:
    if not GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE}")
    return trained("sst2", tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def stored_settings(monkeypatch):
    """The checkpoint's own data and store, whatever the shell that runs the tests says."""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_eval_logs_beside_its_training_run_then_needs_only_the_file(sst2, tmp_path, capsys):
    assert main(["eval", f"checkpoint={sst2.checkpoint}", "eval.latency_examples=8"]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(sst2.tracking_uri)
    experiment = client.get_run(sst2.run_id).info.experiment_id
    [run] = client.search_runs([experiment], "tags.role = 'eval'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["training_run_id"] == sst2.run_id
    assert run.data.tags["checkpoint"] == str(sst2.checkpoint.resolve())
    assert {k: run.data.tags[k] for k in ("method", "task", "model", "budget")} == {
        "method": "none",
        "task": "sst2",
        "model": "minilm",
        "budget": "smoke",
    }
    logged = run.data.metrics
    assert logged["eval/accuracy"] == pytest.approx(sst2.best["best/accuracy"], abs=1e-6)
    assert logged["eval/flops_ratio_padded"] == pytest.approx(sst2.best["best/flops_ratio_padded"], rel=1e-9)
    assert {"eval/cpu_batch_1/wall_speedup", "eval/cpu_batch_32/wall_speedup", "eval/kept_fraction/layer_5"} <= set(
        logged
    )
    assert f"MLflow: eval run {run.info.run_id} in experiment 'tokprune'" in printed

    moved = tmp_path / "elsewhere" / "best.ckpt"
    moved.parent.mkdir()
    shutil.copy(sst2.checkpoint, moved)
    store = Path(sst2.tracking_uri.removeprefix("sqlite:///"))
    store.unlink()
    assert main(["eval", f"checkpoint={moved}", "eval.latency_examples=8"]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy={sst2.best['best/accuracy']:.4f}" in printed
    assert "FLOPs (fvcore, 1 MAC = 1 FLOP): ratio 1.000 vs unpruned at real length" in printed
    assert f"{sst2.best['best/flops_ratio_padded']:.3f} vs padded to 64" in printed
    assert "kept fraction per layer: 1.00 1.00 1.00 1.00 1.00 1.00" in printed
    assert "CPU latency, pruned vs unpruned encoder, same weights (8 dev rows" in printed
    assert f"MLflow: not logged (no MLflow store at {store}" in printed
    assert not store.exists()  # not created empty

    result = evaluate(moved, ["eval.latency_examples=0"])
    assert result.metrics["eval/accuracy"] == pytest.approx(sst2.best["best/accuracy"], abs=1e-6)
    assert result.rows == 64 and result.training_run_id == sst2.run_id


def test_eval_takes_data_settings_and_refuses_the_rest(sst2, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.db"
    broken.write_text("not a database")
    result = evaluate(
        sst2.checkpoint,
        [
            "data.eval_subset=16",
            "train.eval_batch_size=8",
            "eval.latency_examples=0",
            f"mlflow.tracking_uri=sqlite:///{broken}",
        ],
    )
    assert result.rows == 16 and result.latency == []
    assert "CPU latency: skipped (eval.latency_examples=0)" in summary(result)
    assert result.mlflow == "MLflow: not logged (DatabaseError: (sqlite3.DatabaseError) file is not a database)"

    monkeypatch.setenv("GLUE_DIR", "/no/such/glue")  # the environment wins over the stored folder ...
    assert main(["eval", f"checkpoint={sst2.checkpoint}"]) == 2
    assert "data directory /no/such/glue does not exist" in capsys.readouterr().err
    assert (
        evaluate(
            sst2.checkpoint,
            [
                f"data.glue_dir={GLUE}",
                "data.eval_subset=8",  # ... and an override over both
                "eval.latency_examples=0",
            ],
        ).rows
        == 8
    )

    assert main(["eval", f"checkpoint={sst2.checkpoint}", "task=rte"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tokprune: error: eval cannot set 'task' (the checkpoint fixes it)")
