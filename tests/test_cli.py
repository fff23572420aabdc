"""The command line: bad input is one line on stderr and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

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
