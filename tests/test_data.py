"""GLUE: every task's layout, labels and metric; malformed files fail with file and line."""

from pathlib import Path

import datasets
import pytest
import torch

from tokprune.core.data import (
    TASKS,
    GlueDataModule,
    build_metrics,
    find_task_dir,
    get_task,
    load_splits,
    read_glue_tsv,
    seeded_subset,
)
from tokprune.errors import UsageError

from conftest import FIXTURES, GLUE, QQP_SAMPLE, requires_glue

# (task, dev rows, first label) of the real files in ../shared/data
REAL_DEV = [
    ("sst2", 872, 1),
    ("cola", 1043, 1),
    ("mrpc", 408, 1),
    ("rte", 277, 1),
    ("stsb", 1500, 5.0),
    ("qnli", 5463, 0),
]


def test_registry_has_all_eight_tasks_with_official_metrics():
    assert set(TASKS) == {"sst2", "qqp", "mrpc", "rte", "cola", "stsb", "qnli", "mnli"}
    assert TASKS["mrpc"].metrics == ("f1", "accuracy")
    assert TASKS["qqp"].metrics == ("accuracy", "f1")
    assert TASKS["cola"].metrics == ("mcc",)
    assert TASKS["stsb"].metrics == ("pearson", "spearman") and TASKS["stsb"].is_regression
    assert TASKS["mnli"].num_labels == 3 and TASKS["mnli"].dev_file == "dev_matched.tsv"


@requires_glue
@pytest.mark.parametrize("name, rows, first_label", REAL_DEV)
def test_real_glue_dev_files_read_completely(name, rows, first_label):
    task = get_task(name)
    data = read_glue_tsv(GLUE / task.folder / task.dev_file, task)
    assert len(data["label"]) == rows
    assert data["label"][0] == first_label
    assert ("text_b" in data) == (len(task.tsv_text) == 2)
    assert all(isinstance(t, str) and t for t in data["text_a"][:50])


@requires_glue
def test_qqp_sample_reads_in_glue_layout():
    task = get_task("qqp")
    folder = find_task_dir(f"{GLUE}:{QQP_SAMPLE}", task)
    assert folder == QQP_SAMPLE / "QQP"
    assert len(read_glue_tsv(folder / "dev.tsv", task)["label"]) == 1000


def test_mnli_fixture_in_exact_glue_layout():
    splits = load_splits(get_task("mnli"), str(FIXTURES / "glue"), "unused")
    assert len(splits["train"]) == 8 and len(splits["dev"]) == 5
    assert splits["dev"][1]["label"] == 2  # contradiction
    assert splits["train"][0]["text_b"] == "A cat was sitting on a mat."


def _write(tmp_path: Path, folder: str, text: str) -> Path:
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    path = tmp_path / folder / "train.tsv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "file is empty"),
        ("sentence\tlabel\n", "no data rows"),
        ("sentence\tscore\nfine film\t1\n", ":1: missing column(s) label in header"),
        ("sentence\tlabel\ngood\t1\nbad\t7\n", ":3: bad label '7': expected one of 0, 1"),
        ("sentence\tlabel\ngood\t1\njust text\n", ":3: expected at least 2 tab-separated fields, found 1"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, text, message):
    path = _write(tmp_path, "SST-2", text)
    with pytest.raises(UsageError) as err:
        read_glue_tsv(path, get_task("sst2"))
    assert str(path) in str(err.value) and message in str(err.value)


def test_regression_label_must_be_numeric(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = _write(tmp_path, "STS-B", header + "0\tg\tf\ty\t0\tn\tn\tA man.\tA man.\thigh\n")
    with pytest.raises(UsageError, match=r":2: bad label 'high': expected a number"):
        read_glue_tsv(path, get_task("stsb"))


def test_missing_directory_and_missing_task_folder(tmp_path):
    with pytest.raises(UsageError, match="data directory /no/such/dir does not exist"):
        find_task_dir("/no/such/dir", get_task("sst2"))
    with pytest.raises(UsageError, match="task rte: no RTE/train.tsv and dev.tsv under"):
        find_task_dir(str(tmp_path), get_task("rte"))


def test_seeded_subset_is_deterministic_and_in_file_order():
    ds = datasets.Dataset.from_dict({"x": list(range(100))})
    a, b = seeded_subset(ds, 10, seed=3), seeded_subset(ds, 10, seed=3)
    assert a["x"] == b["x"] == sorted(a["x"])
    assert seeded_subset(ds, 10, seed=4)["x"] != a["x"]
    assert len(seeded_subset(ds, None, seed=3)) == 100


def test_hub_path_maps_columns(monkeypatch, tmp_path):
    """Without a GLUE directory rows come from the hub: tested on local parquet files."""
    rows = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [0, 2], "idx": [0, 1]}
    files = {}
    for split in ("train", "validation_matched"):
        files[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_dict(rows).to_parquet(files[split])
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name))
        return real_load_dataset("parquet", data_files=files)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_splits(get_task("mnli"), "", "nyu-mll/glue")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert splits["dev"].column_names == ["text_a", "text_b", "label"]
    assert splits["dev"][1] == {"text_a": "p2", "text_b": "h2", "label": 2}


def test_metrics_per_task():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])
    mrpc = build_metrics(get_task("mrpc"))
    mrpc.update(logits.argmax(-1), labels)
    values = {k: float(v) for k, v in mrpc.compute().items()}
    assert values["accuracy"] == pytest.approx(0.75) and values["f1"] == pytest.approx(2 / 3)
    stsb = build_metrics(get_task("stsb"))
    stsb.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.5, 3.5]))
    assert float(stsb.compute()["pearson"]) == pytest.approx(1.0)


@requires_glue
def test_datamodule_pads_each_batch_dynamically():
    from transformers import AutoTokenizer

    from tokprune.config import compose
    from tokprune.core.backbone import model_location

    tokenizer = AutoTokenizer.from_pretrained(model_location(compose([]).model))
    dm = GlueDataModule(
        get_task("mrpc"),
        tokenizer,
        max_length=128,
        glue_dir=str(GLUE),
        train_subset=40,
        eval_subset=30,
        batch_size=8,
        eval_batch_size=8,
    )
    dm.setup("fit")
    assert dm.size("train") == 40 and dm.size("dev") == 30
    lengths = [b["input_ids"].shape[1] for b in dm.val_dataloader()]
    assert len(set(lengths)) > 1 and max(lengths) <= 128
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    assert set(batch["token_type_ids"].unique().tolist()) == {0, 1}  # sentence pairs


def test_evaluating_reads_only_the_dev_file(tmp_path):
    """A task folder with only dev.tsv (GLUE_DIR's QNLI) validates; fitting names the missing train file."""
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\na fine film\t1\na dull one\t0\n")
    assert list(load_splits(get_task("sst2"), str(tmp_path), "unused", ("dev",))) == ["dev"]
    with pytest.raises(UsageError, match=r"task sst2: .*SST-2 has no train.tsv \(it has dev.tsv"):
        load_splits(get_task("sst2"), str(tmp_path), "unused")
    from transformers import AutoTokenizer

    from tokprune.config import compose
    from tokprune.core.backbone import model_location

    tokenizer = AutoTokenizer.from_pretrained(model_location(compose([]).model))
    dm = GlueDataModule(get_task("sst2"), tokenizer, max_length=16, glue_dir=str(tmp_path))
    dm.setup("validate")
    assert dm.size("dev") == 2 and "train" not in dm.splits
    with pytest.raises(UsageError, match="SST-2 has no train.tsv"):
        dm.setup("fit")


def test_hub_failure_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        UsageError, match=r"could not load nyu-mll/glue/rte from the hub \(ConnectionError\); set GLUE_DIR"
    ):
        load_splits(get_task("rte"), "", "nyu-mll/glue")
