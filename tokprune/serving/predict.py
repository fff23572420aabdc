"""Label new text with a trained checkpoint: ``tokprune.load(path).predict([...])`` and
``python -m tokprune predict checkpoint=PATH input=FILE output=FILE``.

Inference is what the pruning is for, so it runs in hard mode (pruned tokens really
removed) and reports, beside each label, how many tokens every layer computed. Two engines:
``torch`` (the encoder's hard mode) and ``onnx`` (the same model exported with its pruning
decisions and token removal inside the graph, run by ONNX Runtime: ``tokprune.serving.export``; it
reuses ``<checkpoint>.onnx`` when that is newer than the checkpoint, else exports on the fly).
Both give the same labels and kept counts. Everything
comes from the checkpoint file (``tokprune.methods.checkpoint``): the task's labels, its max length
and the tokenizer, so a prediction needs neither the training data nor MLflow.

The command reads a TSV in the task's GLUE layout (recognised by its header holding the
task's text columns; CoLA's has no header and four columns) or plain text, one sentence,
or one tab-separated pair, per line; it writes ``index``, ``prediction``, ``kept_per_layer``
and, when the input had them, the ``label`` column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tokprune.core.data import GlueTask, get_task, read_text_lines
from tokprune.errors import UsageError
from tokprune.methods import rebuild
from tokprune.methods.base import PruningModule
from tokprune.methods.checkpoint import Described

ENGINES = ("torch", "onnx")
Input = str | tuple[str, str]


@dataclass(frozen=True)
class Prediction:
    label: str | float  # the task's raw label value ("1", "entailment"), or the STS-B score
    kept_per_layer: tuple[int, ...]  # tokens each layer computed, [CLS] and [SEP] included


class PrunedModel:
    """A trained checkpoint that labels sentences (or pairs) in batches, in hard mode, with
    torch or ONNX Runtime (``engine``)."""

    def __init__(
        self,
        described: Described,
        module: PruningModule,
        batch_size: int = 32,
        engine: str = "torch",
        quantize: str | None = None,
    ):
        check_engine(engine, quantize)
        self.cfg = described.cfg
        self.task: GlueTask = get_task(self.cfg.task.name)
        self.max_length = int(self.cfg.task.max_length)
        self.tokenizer = described.tokenizer()
        self.module = module.cpu().eval()
        self.batch_size = batch_size
        self.engine = engine
        self.onnx = None
        if engine == "onnx":
            from tokprune.serving.export import session_for

            self.onnx = session_for(described, self.module, quantize=quantize)

    @classmethod
    def load(
        cls, path: str | Path, engine: str = "torch", batch_size: int = 32, quantize: str | None = None
    ) -> PrunedModel:
        check_engine(engine)
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, not {batch_size}")
        return cls(*rebuild(path), batch_size=batch_size, engine=engine, quantize=quantize)

    @property
    def pairs(self) -> bool:
        return len(self.task.tsv_text) == 2

    def predict(self, inputs: Sequence[Input], batch_size: int | None = None) -> list[Prediction]:
        """One prediction per input: sentences for single-sentence tasks, (s1, s2) for pair tasks;
        each truncated at the task's max length."""
        columns = self._columns(inputs)
        size = batch_size or self.batch_size
        predictions = []
        with torch.inference_mode():
            for start in range(0, len(inputs), size):
                texts = [column[start : start + size] for column in columns]
                batch = self.tokenizer(
                    *texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                logits, kept = self.run(dict(batch))
                for scores, counts in zip(logits, kept.tolist()):
                    predictions.append(Prediction(self._label(scores), tuple(counts)))
        return predictions

    def run(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits B x labels, kept B x L) of a tokenised batch, on this model's engine."""
        if self.onnx is not None:
            return self.onnx(batch)
        logits, out = self.module(batch, hard=True)
        return logits, out.kept_counts().T

    def _columns(self, inputs: Sequence[Input]) -> list[list[str]]:
        if isinstance(inputs, (str, tuple)):
            raise UsageError("predict takes a list of inputs: wrap a single one in a list")
        want = "a pair of strings (s1, s2)" if self.pairs else "a string"
        for i, item in enumerate(inputs):
            ok = (
                isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)
                if self.pairs
                else isinstance(item, str)
            )
            if not ok:
                raise UsageError(f"input {i}: {self.task.name} takes {want}, not {item!r}")
        return [list(column) for column in zip(*inputs)] if self.pairs else [list(inputs)]

    def _label(self, scores: torch.Tensor) -> str | float:
        if self.task.is_regression:
            return float(scores[0])
        return self.task.label_values[int(scores.argmax())]


# -- the command -------------------------------------------------------------------------


def read_inputs(path: Path, task: GlueTask) -> tuple[list[Input], list[str] | None]:
    """(inputs, their labels or None) from a GLUE-layout TSV or plain text; a line with the
    wrong number of fields is an error naming the file and line."""
    lines = read_text_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UsageError(f"{path}: no inputs")
    first = lines[0].rstrip("\r").split("\t")
    if task.header and all(c in first for c in task.tsv_text):  # GLUE layout, header first
        text = [first.index(c) for c in task.tsv_text]
        label = first.index(task.tsv_label) if task.tsv_label in first else None
        width, start, layout = len(first), 1, f"GLUE {task.folder} layout (header: {len(first)} columns)"
    elif not task.header and len(first) > max(task.tsv_text):  # GLUE layout without a header (CoLA)
        text, label = list(task.tsv_text), task.tsv_label
        width, start, layout = len(first), 0, f"GLUE {task.folder} layout ({len(first)} columns)"
    else:
        text, label = list(range(len(task.tsv_text))), None
        width, start = len(text), 0
        layout = "plain text: one tab-separated pair per line" if width == 2 else "plain text: one sentence per line"
    inputs, labels = [], []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != width:
            raise UsageError(
                f"{path}:{lineno}: expected {width} tab-separated field(s) ({layout}), found {len(fields)}"
            )
        texts = [fields[i] for i in text]
        inputs.append(texts[0] if len(texts) == 1 else tuple(texts))
        if label is not None:
            labels.append(fields[label].strip())
    if not inputs:
        raise UsageError(f"{path}: a header but no inputs")
    return inputs, (labels if label is not None else None)


def write_predictions(path: Path, predictions: list[Prediction], labels: list[str] | None) -> None:
    header = ["index", "prediction", "kept_per_layer"] + (["label"] if labels is not None else [])
    rows = ["\t".join(header)]
    for i, p in enumerate(predictions):
        label = f"{p.label:.4f}" if isinstance(p.label, float) else p.label
        row = [str(i), label, ",".join(map(str, p.kept_per_layer))] + ([labels[i]] if labels is not None else [])
        rows.append("\t".join(row))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def check_engine(engine: str, quantize: str | None = None) -> None:
    """A known engine whose packages are installed, and a quantisation it runs, or a one-line error."""
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, not '{engine}'")
    if quantize and engine != "onnx":
        raise UsageError(f"quantize={quantize} is an ONNX Runtime graph: use engine=onnx")
    if engine == "onnx":
        from tokprune.serving.export import require

        require("onnxruntime")
        require("onnx")


def run_predict(
    checkpoint: str, source: str, target: str, batch_size: int = 32, engine: str = "torch", quantize: str | None = None
) -> str:
    """The ``predict`` command: label every input of ``source``, write them to ``target``;
    returns the line to print."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise UsageError(f"input: no such file '{source}'")
    if not target.parent.is_dir():
        raise UsageError(f"output: no such folder '{target.parent}'")
    if target.resolve() == source.resolve():
        raise UsageError(f"output '{target}' is the input file: give another path")
    check_engine(engine)
    model = PrunedModel.load(checkpoint, batch_size=batch_size, engine=engine, quantize=quantize)
    inputs, labels = read_inputs(source, model.task)
    predictions = model.predict(inputs)
    write_predictions(target, predictions, labels)
    mean_kept = [sum(layer) / len(predictions) for layer in zip(*(p.kept_per_layer for p in predictions))]
    where = "hard mode" if engine == "torch" else f"hard mode, ONNX Runtime: {model.onnx.source}"
    return (
        f"wrote {len(predictions)} predictions ({model.task.name}, {where}) to {target}; "
        f"mean tokens kept per layer: {' '.join(f'{k:.1f}' for k in mean_kept)}"
    )
