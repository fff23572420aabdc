"""GLUE: the task registry (columns, labels, official metric) and a LightningDataModule.

Data comes from a directory in GLUE's original TSV layout (``<dir>/<Folder>/{train,dev}.tsv``)
when one is configured, else from the hub (``nyu-mll/glue``) through ``datasets``. Either
way rows end up as ``text_a``, ``text_b`` (pairs only) and ``label`` (class index, or a
float for STS-B), so nothing downstream knows where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics import (
    Accuracy,
    F1Score,
    MatthewsCorrCoef,
    MetricCollection,
    PearsonCorrCoef,
    SpearmanCorrCoef,
)
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from tokprune.errors import UsageError

Column = str | int  # a header name, or a 0-based index for header-less files (CoLA)


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is stored, labelled and scored."""

    name: str
    folder: str  # folder in the GLUE TSV layout
    tsv_text: tuple[Column, ...]  # one column (single sentence) or two (pairs)
    tsv_label: Column
    label_values: tuple[str, ...] | None  # raw TSV labels in class-index order; None = regression
    hub_text: tuple[str, ...]
    metrics: tuple[str, ...]  # official metrics; the first is the one sweeps optimise
    dev_file: str = "dev.tsv"
    hub_eval_split: str = "validation"
    header: bool = True

    @property
    def num_labels(self) -> int:
        return len(self.label_values) if self.label_values else 1

    @property
    def is_regression(self) -> bool:
        return self.label_values is None

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("sentence",), ("accuracy",)),
        GlueTask("cola", "CoLA", (3,), 1, ("0", "1"), ("sentence",), ("mcc",), header=False),
        GlueTask(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("0", "1"),
            ("sentence1", "sentence2"),
            ("f1", "accuracy"),
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            ("0", "1"),
            ("question1", "question2"),
            ("accuracy", "f1"),
        ),
        GlueTask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            None,
            ("sentence1", "sentence2"),
            ("pearson", "spearman"),
        ),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            ("premise", "hypothesis"),
            ("accuracy",),
            dev_file="dev_matched.tsv",
            hub_eval_split="validation_matched",
        ),
        GlueTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, ("question", "sentence"), ("accuracy",)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, ("sentence1", "sentence2"), ("accuracy",)),
    ]
}


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}': choose from {', '.join(sorted(TASKS))}")
    return TASKS[name]


def build_metrics(task: GlueTask) -> MetricCollection:
    """The task's official GLUE metrics as torchmetrics objects (inputs: logits, labels)."""
    makers = {
        "accuracy": lambda: Accuracy(task="multiclass", num_classes=task.num_labels),
        "f1": lambda: F1Score(task="binary"),
        "mcc": lambda: MatthewsCorrCoef(task="binary"),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    return MetricCollection({name: makers[name]() for name in task.metrics})


def metric_inputs(task: GlueTask, logits: torch.Tensor) -> torch.Tensor:
    """What the metrics compare against labels: class ids, or the regression score."""
    return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)


# ----------------------------------------------------------------------------- reading TSV


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped); bytes that are not UTF-8 are an error
    naming the file and the line they are on."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "expected a UTF-8 text file"
        ) from None
    return text.split("\n")


def read_glue_tsv(path: Path, task: GlueTask) -> dict[str, list]:
    """Read one GLUE TSV file; a malformed row is an error naming the file and line."""
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    lines = read_text_lines(path)
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UsageError(f"{path}: file is empty")
    start = 0
    columns = list(task.tsv_text) + [task.tsv_label]
    if task.header:
        header = lines[0].rstrip("\r").split("\t")
        missing = [c for c in columns if c not in header]
        if missing:
            raise UsageError(f"{path}:1: missing column(s) {', '.join(map(str, missing))} in header")
        index = [header.index(c) for c in columns]
        start = 1
    else:
        index = [int(c) for c in columns]
    if len(lines) <= start:
        raise UsageError(f"{path}: no data rows")
    rows: dict[str, list] = {"text_a": [], "label": []}
    if len(task.tsv_text) == 2:
        rows["text_b"] = []
    needed = max(index) + 1
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) < needed:
            raise UsageError(f"{path}:{lineno}: expected at least {needed} tab-separated fields, found {len(fields)}")
        rows["text_a"].append(fields[index[0]])
        if "text_b" in rows:
            rows["text_b"].append(fields[index[1]])
        rows["label"].append(_parse_label(fields[index[-1]], task, path, lineno))
    return rows


def _parse_label(raw: str, task: GlueTask, path: Path, lineno: int):
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"{path}:{lineno}: bad label '{raw}': expected a number") from None
    if raw not in task.label_values:
        raise UsageError(f"{path}:{lineno}: bad label '{raw}': expected one of {', '.join(task.label_values)}")
    return task.label_values.index(raw)


SPLITS = ("train", "dev")
ROW = "row"  # training batches carry each example's index in the (subset) training set under this key


def split_file(task: GlueTask, split: str) -> str:
    """The TSV file name of a split in GLUE's layout."""
    return "train.tsv" if split == "train" else task.dev_file


def find_task_dir(glue_dir: str, task: GlueTask, splits: tuple[str, ...] = SPLITS) -> Path:
    """The first folder of a ':'-separated GLUE_DIR list that holds the task's files for ``splits``."""
    dirs = [Path(d).expanduser() for d in glue_dir.split(":") if d]
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"data directory {d} does not exist (data.glue_dir / GLUE_DIR)")
    files = [split_file(task, split) for split in splits]
    for d in dirs:
        if all((d / task.folder / f).is_file() for f in files):
            return d / task.folder
    partial = next((d / task.folder for d in dirs if (d / task.folder).is_dir()), None)
    if partial is not None:  # the task's folder is there, some of its files are not: say which
        missing = [f for f in files if not (partial / f).is_file()]
        present = sorted(p.name for p in partial.glob("*.tsv"))
        raise UsageError(
            f"task {task.name}: {partial} has no {' and no '.join(missing)} (it has "
            f"{', '.join(present) or 'no .tsv file'}; data.glue_dir / GLUE_DIR)"
        )
    raise UsageError(
        f"task {task.name}: no {task.folder}/{' and '.join(files)} under {', '.join(map(str, dirs))} "
        "(data.glue_dir / GLUE_DIR)"
    )


def load_splits(
    task: GlueTask, glue_dir: str, hub_dataset: str, splits: tuple[str, ...] = SPLITS
) -> dict[str, datasets.Dataset]:
    """The ``splits`` (train, dev) as ``datasets.Dataset`` with text_a[, text_b], label; only those
    are read, so evaluating needs no train file."""
    if glue_dir:
        folder = find_task_dir(glue_dir, task, splits)
        return {
            split: datasets.Dataset.from_dict(read_glue_tsv(folder / split_file(task, split), task)) for split in splits
        }
    try:
        hub = datasets.load_dataset(hub_dataset, task.name)
    except Exception as exc:  # offline, unknown repo, ...: say what to do instead
        raise UsageError(
            f"could not load {hub_dataset}/{task.name} from the hub ({type(exc).__name__}); "
            "set GLUE_DIR or data.glue_dir to a folder in GLUE's TSV layout"
        ) from None
    names = {src: dst for src, dst in zip(task.hub_text, ("text_a", "text_b"))}
    hub_splits = {"train": "train", "dev": task.hub_eval_split}
    out = {}
    for split in splits:
        ds = hub[hub_splits[split]]
        keep = list(names) + ["label"]
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep]).rename_columns(names)
        out[split] = ds
    return out


def seeded_subset(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """The same ``n`` rows for the same seed, kept in file order; all rows if n is None."""
    if n is None or n >= len(ds):
        return ds
    rows = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return ds.select(rows.tolist())


class GlueDataModule(L.LightningDataModule):
    """Tokenised GLUE splits with dynamic padding per batch."""

    def __init__(
        self,
        task: GlueTask,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        glue_dir: str = "",
        hub_dataset: str = "nyu-mll/glue",
        train_subset: int | None = None,
        eval_subset: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        seed: int = 42,
        num_workers: int = 0,
    ):
        super().__init__()
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self.glue_dir, self.hub_dataset = glue_dir, hub_dataset
        self.train_subset, self.eval_subset = train_subset, eval_subset
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.collate = DataCollatorWithPadding(tokenizer)
        self.splits: dict[str, datasets.Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the splits ``stage`` needs: dev only to validate, train too to fit."""
        needed = SPLITS if stage in (None, "fit") else ("dev",)
        missing = tuple(split for split in needed if split not in self.splits)
        if not missing:
            return
        datasets.disable_progress_bars()
        raw = load_splits(self.task, self.glue_dir, self.hub_dataset, missing)
        sizes = {"train": self.train_subset, "dev": self.eval_subset}
        for split, ds in raw.items():
            ds = seeded_subset(ds, sizes[split], self.seed)
            ds = ds.map(self._tokenize, batched=True, remove_columns=ds.column_names)
            if split == "train":  # lets a method look up per-row values computed once (a teacher's outputs)
                ds = ds.add_column(ROW, list(range(len(ds))))
            self.splits[split] = ds
            self.splits[split].set_format("torch")

    def _tokenize(self, rows: dict) -> dict:
        texts = [rows["text_a"]] + ([rows["text_b"]] if "text_b" in rows else [])
        enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
        enc["labels"] = rows["label"]
        return enc

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", self.eval_batch_size, shuffle=False)

    def size(self, split: str) -> int:
        return len(self.splits[split])
