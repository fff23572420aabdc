"""The command line: bad input is one line on stderr and exit code 2, anything else one line
and exit code 1 with the traceback in a file; never a traceback on the terminal."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tokprune import cli
from tokprune.errors import Stopped

from conftest import GLUE, ROOT


def tokprune(*args, env=None, cwd=None):
    full_env = {**os.environ, "GLUE_DIR": str(GLUE), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tokprune", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "task=nope"], "unknown task 'nope': choose from cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"),
        (["train", "method=magic"], "unknown method 'magic': choose from"),
        (["train", "train.lr=fast"], "bad value for train.lr: 'fast' is not a number"),
        (["train", "train.learning_rate=1"], "unknown config key 'train.learning_rate'"),
        (["train", "data.glue_dir=/no/such/glue"], "data directory /no/such/glue does not exist"),
        (["train", "checkpoint=x.ckpt"], "unknown config key 'checkpoint'"),
        (["eval"], "eval needs checkpoint=PATH"),
        (["eval", "checkpoint=/no/such.ckpt"], "checkpoint: no such file '/no/such.ckpt'"),
        (["eval", "checkpoint=/no/such.ckpt", "train.lr=1"], "eval cannot set 'train.lr' (the checkpoint fixes it)"),
        (["eval", "checkpoint=x", "data.eval_subset=all"], "bad value for data.eval_subset: 'all'"),
        (["predict", "checkpoint=x", "input=y"], "predict needs output=FILE"),
        (["predict", "checkpoint=x", "input=/no/such.txt", "output=o.tsv"], "input: no such file '/no/such.txt'"),
        (["predict", "checkpoint=x", "input=a", "output=b", "train.lr=1"], "predict takes checkpoint=PATH"),
        (
            ["train", "method=top", "method.reg_lr=abc"],
            "bad value for method.reg_lr: 'abc' is not a number (expected a number > 0)",
        ),
        (
            ["sweep", "method=top", "sweep.storage=mongodb://u@h/db"],
            "storage 'mongodb://u@h/db': SQLAlchemy has no dialect 'mongodb'; give a journal file path",
        ),
        (["train", "task=qnli"], "QNLI has no train.tsv (it has dev.tsv;"),
        (["eval", "checkpoint=RANDOM_BYTES"], "is not a tokprune checkpoint: torch.load cannot read it"),
        (["train", "protocol=fair"], "unknown protocol 'fair': choose from paper, shared"),
        (
            ["train", "protocol.target_flops=1.5"],
            "bad value for protocol.target_flops: 1.5 (expected a number in (0, 1])",
        ),
        (["repeat", "trial=x", "seeds=2"], "trial=x: expected a whole number"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    random_bytes = tmp_path / "random.bin"
    random_bytes.write_bytes(os.urandom(2000))
    result = tokprune(*[a.replace("RANDOM_BYTES", str(random_bytes)) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokprune: error: ")
    assert message in lines[0]


def test_malformed_tsv_exits_2_naming_file_and_line(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nok\t0\n")
    result = tokprune("train", "budget=smoke", f"data.glue_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tokprune: error: {tmp_path}/SST-2/train.tsv:3: bad label 'maybe': expected one of 0, 1"
    ]


def test_predict_on_bytes_that_are_not_utf8_names_the_file_and_line(tmp_path):
    from tokprune.core.data import get_task
    from tokprune.errors import UsageError
    from tokprune.serving.predict import read_inputs

    path = tmp_path / "input.txt"
    path.write_bytes(b"a fine film\nthen \xff\xfe bytes\n")
    with pytest.raises(UsageError) as error:
        read_inputs(path, get_task("sst2"))
    assert str(error.value) == f"{path}:2: not UTF-8 text (byte 0xff at offset 17); expected a UTF-8 text file"


def test_no_command_prints_help_and_exits_2():
    result = tokprune()
    assert result.returncode == 2 and "train" in result.stderr


def test_an_unexpected_error_is_one_line_exit_1_with_the_traceback_in_a_file(monkeypatch, tmp_path, capsys):
    def broken(overrides):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "cmd_train", broken)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "task=sst2"]) == 1
    log = tmp_path / cli.ERROR_LOG
    stderr = capsys.readouterr().err
    assert stderr.splitlines() == [f"tokprune: error: RuntimeError: disk on fire (full traceback in {log})"]
    assert "Traceback" not in stderr
    saved = log.read_text()
    assert "tokprune train task=sst2" in saved and "Traceback (most recent call last)" in saved
    assert "in broken" in saved and "RuntimeError: disk on fire\nsecond line" in saved


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert cli.main(["eval", "checkpoint=x"]) == 130
    assert capsys.readouterr().err.splitlines() == ["tokprune: interrupted"]


def test_a_signal_inside_store_code_is_delivered_again_once_out_of_it(monkeypatch):
    """A signal that lands in the middle of an MLflow (SQLAlchemy) statement is re-sent a moment
    later: raised there, the statement kept its SQLite lock and closing the run as FAILED hit
    "database is locked", which turned exit 143 into exit 1 with a traceback."""
    sent = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    store_code = {"__name__": "sqlalchemy.engine.cursor", "sys": sys}
    exec("def frame():\n    return sys._getframe()", store_code)
    cli._ARMED.set()  # as main() does while a command runs
    try:
        assert cli._stop(signal.SIGTERM, store_code["frame"]()) is None  # not raised inside it
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        cli._ARMED.clear()
    assert sent == [(os.getpid(), signal.SIGTERM)]
    with pytest.raises(Stopped):  # anywhere else: at once
        cli._stop(signal.SIGTERM, sys._getframe())
    assert cli._stop(signal.SIGTERM, store_code["frame"]()) is None
    time.sleep(0.2)
    assert len(sent) == 1  # once the command has ended (the default handler back), never sent again


def test_lightnings_own_sigterm_exit_ends_the_command_as_our_sigterm_does(monkeypatch, capsys):
    """Lightning's handler sees SIGTERM before ours and, when ours waited for a store statement,
    stops the fit with its SIGTERMException (a SystemExit) first: that is exit 143 with our line."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def fit_stopped_by_lightning(overrides):
        raise SIGTERMException

    monkeypatch.setattr(cli, "cmd_eval", fit_stopped_by_lightning)
    assert cli.main(["eval", "checkpoint=x"]) == 143
    assert capsys.readouterr().err.splitlines() == [
        "tokprune: stopped by SIGTERM: exit code 143 (an open MLflow run was marked FAILED)"
    ]


def test_train_says_when_no_validation_met_the_constraint(monkeypatch, capsys):
    import tokprune.training.train
    from tokprune.methods.selection import Selected

    best = {
        "val/accuracy": 0.77,
        "val/flops_ratio_real": 0.4,
        "val/flops_ratio_padded": 0.15,
        "val/kept_fraction/layer_0": 1.0,
    }
    result = tokprune.training.train.RunResult(
        "r1", "sqlite:///x.db", best, Selected(1, "best_meeting_constraint", False), "best.ckpt", 10, 5, 2, 20, 1.0
    )
    monkeypatch.setattr(tokprune.training.train, "train", lambda cfg: result)
    assert cli.main(["train", "method=top"]) == 0
    assert (
        "note: no validation met the method's constraint: the result is the last validation" in capsys.readouterr().out
    )
    monkeypatch.setattr(
        tokprune.training.train,
        "train",
        lambda cfg: tokprune.training.train.RunResult(
            "r1", "sqlite:///x.db", best, Selected(0, "best_meeting_constraint", True), "best.ckpt", 10, 5, 2, 20, 1.0
        ),
    )
    assert cli.main(["train", "method=top"]) == 0
    assert "note:" not in capsys.readouterr().out


# -- signals and killed runs ------------------------------------------------------------------


def _running_run(uri: str, proc, timeout: float = 240.0):
    """Wait until the store has a RUNNING run (the command is training); the run."""
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited early"
        experiment = client.get_experiment_by_name("tokprune")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        if runs:
            time.sleep(3)  # into the training loop
            return client, runs[0]
        time.sleep(0.5)
    raise AssertionError("no run started")


def _long_training(tmp_path, glue_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "train",
        "model=tiny",
        "budget=smoke",
        "train.max_steps=-1",
        "train.epochs=100000",
        f"data.glue_dir={glue_dir}",
        f"mlflow.tracking_uri={uri}",
        f"train.checkpoint_dir={tmp_path}/ckpt",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokprune", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return uri, proc


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_train_exits_128_plus_signum_with_one_line_and_the_run_failed(signum, code, tmp_path, glue_dir):
    uri, proc = _long_training(tmp_path, glue_dir)
    client, run = _running_run(uri, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == code
    lines = [line for line in proc.stderr.read().splitlines() if line.startswith("tokprune:")]
    assert lines == [
        f"tokprune: stopped by {signal.Signals(signum).name}: exit code {code} (an open MLflow run was marked FAILED)"
    ]
    assert client.get_run(run.info.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_a_train_killed_with_sigkill_is_marked_failed_by_the_next_command_on_the_store(tmp_path, glue_dir):
    from tokprune.config import compose
    from tokprune.training.tracking import reap_store

    uri, proc = _long_training(tmp_path, glue_dir)
    client, run = _running_run(uri, proc)
    assert run.data.tags["host"] and run.data.tags["pid"] == str(proc.pid)  # who runs it
    proc.kill()
    proc.wait()
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nobody closed it
    assert reap_store(compose([f"mlflow.tracking_uri={uri}"])) == [run.info.run_id]  # what train/eval do first
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED" and "is gone" in closed.data.tags["failure"]


def test_runs_of_other_hosts_are_left_alone_until_older_than_the_limit(tmp_path):
    from mlflow.tracking import MlflowClient

    from tokprune.training.tracking import reap_dead_runs

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("tokprune")
    elsewhere = client.create_run(experiment, tags={"host": "another-machine", "pid": "1"}).info.run_id
    mine = client.create_run(experiment, tags={"host": cli_host(), "pid": str(os.getpid())}).info.run_id
    assert reap_dead_runs(client, experiment, stale_hours=1) == []  # mine runs; the other host's is young
    assert reap_dead_runs(client, experiment, stale_hours=1e-9) == [elsewhere]
    assert client.get_run(mine).info.status == "RUNNING"


def cli_host() -> str:
    from tokprune.core.liveness import HOST

    return HOST


@pytest.mark.parametrize("command", ["eval", "predict", "export", "report", "bench"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_every_command_turns_a_signal_into_one_line_and_128_plus_signum(command, signum, monkeypatch, capsys):
    def receives(words):
        os.kill(os.getpid(), signum)  # the handler raises here, as it would anywhere in the command
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(cli, f"cmd_{command}", receives)
    assert cli.main([command]) == 128 + signum
    assert capsys.readouterr().err.splitlines() == [
        f"tokprune: stopped by {signal.Signals(signum).name}: exit code {128 + signum} "
        "(an open MLflow run was marked FAILED)"
    ]
    assert signal.getsignal(signal.SIGTERM) is not cli._stop  # handlers restored
