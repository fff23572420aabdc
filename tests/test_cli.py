"""The command line: bad input is one line on stderr and exit code 2, anything else one line
and exit code 1 with the traceback in a file; never a traceback on the terminal."""

import os
import subprocess
import sys

import pytest

from tokprune import cli

from conftest import GLUE, ROOT


def tokprune(*args, env=None, cwd=None):
    full_env = {**os.environ, "GLUE_DIR": str(GLUE), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tokprune", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd or ROOT, timeout=300,
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
    ],
)
def test_bad_input_exits_2_with_one_line(args, message):
    result = tokprune(*args)
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


def test_train_says_when_no_validation_met_the_constraint(monkeypatch, capsys):
    import tokprune.train
    from tokprune.selection import Selected

    best = {"val/accuracy": 0.77, "val/flops_ratio_real": 0.4, "val/flops_ratio_padded": 0.15,
            "val/kept_fraction/layer_0": 1.0}
    result = tokprune.train.RunResult("r1", "sqlite:///x.db", best, Selected(1, "best_meeting_constraint", False),
                                      "best.ckpt", 10, 5, 2, 20, 1.0)
    monkeypatch.setattr(tokprune.train, "train", lambda cfg: result)
    assert cli.main(["train", "method=top"]) == 0
    assert "note: no validation met the method's constraint: the result is the last validation" in capsys.readouterr().out
    monkeypatch.setattr(tokprune.train, "train", lambda cfg: tokprune.train.RunResult(
        "r1", "sqlite:///x.db", best, Selected(0, "best_meeting_constraint", True), "best.ckpt", 10, 5, 2, 20, 1.0))
    assert cli.main(["train", "method=top"]) == 0
    assert "note:" not in capsys.readouterr().out
