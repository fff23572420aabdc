"""`predict` and `tokprune.load`: real dev rows in, one label and kept-token counts per row out,
the command and the Python API agreeing exactly."""

import subprocess
import sys

import pytest
from test_eval import sst2, trained  # noqa: F401  (sst2: the fixture, the same trained checkpoint)

import tokprune
from tokprune.cli import main
from tokprune.errors import UsageError

from conftest import GLUE

ROWS = 10


@pytest.fixture(scope="module")
def mrpc(tmp_path_factory):
    if not GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE}")
    return trained("mrpc", tmp_path_factory.getbasetemp())


def dev_rows(folder: str) -> tuple[str, list[list[str]]]:
    """The header and the first ROWS rows of a GLUE dev file, split into fields."""
    lines = (GLUE / folder / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()
    return lines[0], [line.split("\t") for line in lines[1 : ROWS + 1]]


def read_tsv(path) -> tuple[list[str], list[dict[str, str]]]:
    header, *rows = [line.split("\t") for line in path.read_text().splitlines()]
    return header, [dict(zip(header, row)) for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("task, layout", [("sst2", "glue"), ("sst2", "plain"), ("mrpc", "glue"), ("mrpc", "plain")])
def test_predict_command_and_api_agree_on_real_dev_rows(task, layout, request, tmp_path, capsys):
    checkpoint = request.getfixturevalue(task).checkpoint
    header, rows = dev_rows({"sst2": "SST-2", "mrpc": "MRPC"}[task])
    columns = header.split("\t")
    text = [columns.index(c) for c in ({"sst2": ("sentence",), "mrpc": ("#1 String", "#2 String")}[task])]
    inputs = [row[text[0]] if len(text) == 1 else (row[text[0]], row[text[1]]) for row in rows]
    source = tmp_path / f"in.{'tsv' if layout == 'glue' else 'txt'}"
    lines = (
        [header, *("\t".join(row) for row in rows)]
        if layout == "glue"
        else [x if isinstance(x, str) else "\t".join(x) for x in inputs]
    )
    source.write_text("\n".join(lines) + "\n")

    target = tmp_path / "out.tsv"
    assert main(["predict", f"checkpoint={checkpoint}", f"input={source}", f"output={target}", "batch_size=4"]) == 0
    assert f"wrote {ROWS} predictions ({task}, hard mode) to {target}" in capsys.readouterr().out
    columns_out, written = read_tsv(target)
    labelled = layout == "glue"
    assert columns_out == ["index", "prediction", "kept_per_layer"] + (["label"] if labelled else [])
    assert [r["index"] for r in written] == [str(i) for i in range(ROWS)]
    if labelled:
        label = columns.index({"sst2": "label", "mrpc": "Quality"}[task])
        assert [r["label"] for r in written] == [row[label] for row in rows]

    model = tokprune.load(checkpoint, batch_size=4)
    predictions = model.predict(inputs)
    assert [r["prediction"] for r in written] == [p.label for p in predictions]
    assert [r["kept_per_layer"] for r in written] == [",".join(map(str, p.kept_per_layer)) for p in predictions]
    for x, p in zip(inputs, predictions):
        assert p.label in ("0", "1") and len(p.kept_per_layer) == 6
        assert list(p.kept_per_layer) == sorted(p.kept_per_layer, reverse=True)  # never grows with depth
        pair = (x,) if isinstance(x, str) else x
        tokens = model.tokenizer(*pair, truncation=True, max_length=model.max_length)["input_ids"]
        assert p.kept_per_layer[0] == len(tokens)  # method none: every real token, up to the max length


@pytest.mark.slow
def test_a_line_with_the_wrong_number_of_fields_is_one_line_naming_file_and_line(mrpc, tmp_path, capsys):
    source = tmp_path / "pairs.txt"
    source.write_text("a cat sat\ta cat was sitting\nfine\tgood\nonly one sentence\n")
    assert main(["predict", f"checkpoint={mrpc.checkpoint}", f"input={source}", f"output={tmp_path / 'o.tsv'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tokprune: error: {source}:3: expected 2 tab-separated field(s) "
        "(plain text: one tab-separated pair per line), found 1"
    ]
    assert not (tmp_path / "o.tsv").exists()


def test_other_engines_are_a_clear_error_before_any_file_is_read():
    with pytest.raises(UsageError, match="engine must be one of torch, onnx, not 'tensorrt'"):
        tokprune.load("/no/such.ckpt", engine="tensorrt")


def test_import_tokprune_stays_light():
    code = "import sys, tokprune; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'lightning')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
