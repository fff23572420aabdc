"""DDP on CPU (gloo): two processes log the same dev FLOPs and kept fractions as one.

Each process validates half of the dev set; the token-pruning callback sums the halves
before it takes ratios. The check that rank 0's half alone gives other numbers keeps the
test able to fail.
"""

import os
import subprocess
import sys

import lightning as L
import pytest
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from tokprune.methods import rebuild
from tokprune.training.callbacks import TokenPruningCallback
from tokprune.training.train import build_datamodule

from conftest import ROOT

pytestmark = pytest.mark.slow

DEV_ROWS = 64  # divisible by 2: DistributedSampler would pad an odd split with a repeated row
COMMON = [
    "model=tiny",
    "budget=smoke",
    f"data.eval_subset={DEV_ROWS}",
    "train.accelerator=cpu",
    # random skim predictors without the keep bias drop most tokens at evaluation: something to count
    "method=transkimmer",
    "protocol=paper",  # from the weights as built: no baseline to find (see the test below for shared)
    "method.keep_bias=0",
    # the weights stay as initialised, so both runs (4 steps on one process, 2 on two) validate one model
    "train.lr=1e-12",
]
COMPARED = (
    "val/flops",
    "val/flops_ratio_real",
    "val/flops_ratio_padded",
    "val/kept_fraction/layer_0",
    "val/kept_fraction/layer_1",
)


def run_cli(folder, glue_dir, *extra):
    """``python -m tokprune train`` on a fresh store; its one run, which must be FINISHED."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = [*COMMON, *extra, f"mlflow.tracking_uri={uri}", f"train.checkpoint_dir={folder / 'ckpt'}"]
    env = {**os.environ, "GLUE_DIR": glue_dir}
    proc = subprocess.run(
        [sys.executable, "-m", "tokprune", "train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    run = runs[0]
    assert [p.name for p in (folder / "ckpt").iterdir()] == [run.info.run_id]
    assert run.data.tags["checkpoint"] == str(folder / "ckpt" / run.info.run_id / "best.ckpt")
    return run, proc.stdout


def validate(described, module, rows):
    """The callback's ``val/`` values for a rebuilt checkpoint on these dev rows, one process."""
    datamodule = build_datamodule(described.cfg, described.tokenizer())
    datamodule.setup("fit")
    loader = DataLoader(datamodule.splits["dev"].select(list(rows)), batch_size=32, collate_fn=datamodule.collate)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TokenPruningCallback(described.cfg.task.max_length)],
    )
    return {k: float(v) for k, v in trainer.validate(module, loader, verbose=False)[0].items()}


def test_two_processes_log_the_whole_dev_set(glue_dir, tmp_path):
    two, out = run_cli(tmp_path / "two", glue_dir, "train.devices=2", "train.strategy=ddp")
    one, _ = run_cli(tmp_path / "one", glue_dir, "train.devices=1")
    assert f"run {two.info.run_id} " in out and "run None" not in out  # rank 1 reports rank 0's run too
    logged = {name: run.data.metrics for name, run in (("two", two), ("one", one))}
    for key in COMPARED:
        assert logged["two"][key] == pytest.approx(logged["one"][key], rel=1e-6, abs=1e-6), key

    described, module = rebuild(two.data.tags["checkpoint"])
    assert described.run_id == two.info.run_id
    whole, rank0 = validate(described, module, range(DEV_ROWS)), validate(described, module, range(0, DEV_ROWS, 2))
    assert 0.0 < whole["val/kept_fraction/layer_1"] < 0.5  # the model prunes
    for key in COMPARED:
        assert logged["one"][key] == pytest.approx(whole[key], rel=1e-6, abs=1e-6), key
        # what rank 0 alone would have logged (DistributedSampler gives it rows 0, 2, 4, ...): far off
        assert rank0[key] != pytest.approx(whole[key], rel=1e-4), key


def test_a_multi_process_run_does_not_train_its_baseline_inside_itself(tmp_path, glue_dir):
    """protocol=shared needs the baseline: several processes would each train one, so a run on
    train.devices=2 says to train it first, in one line, before anything starts."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokprune",
            "train",
            "model=tiny",
            "budget=smoke",
            "method=gate",
            "train.devices=2",
            "train.strategy=ddp",
            "train.accelerator=cpu",
            f"mlflow.tracking_uri={uri}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        ],
        cwd=ROOT,
        env={**os.environ, "GLUE_DIR": glue_dir},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "a baseline is not trained inside a run on train.devices=2: train it first" in proc.stderr
