"""The training protocol a learned method runs under (``protocol=shared | paper``), applied by the
shared module (``methods.base``), not by each method.

``protocol=shared`` (default; ../shared/METHODS.md, "The shared protocol") puts every learned
method on one footing, so a comparison measures the pruning and not the recipe:

- **start**: the weights of the task's fine-tuned baseline (``protocol.baseline_checkpoint``;
  empty: found in the MLflow store or trained once); a method's own parameters (predictors,
  gates, masks, multipliers) keep their own initialisation;
- **distillation**: ``(1 - w) * task + w * KD`` from that baseline with one weight and temperature
  for every method (ToP keeps its reference loss, which replaces the labels, and its ranking
  distillation). The teacher is frozen and deterministic, so its outputs per training row are
  computed once per baseline checkpoint and training set and reused (``TeacherOutputs``);
- **target**: the expected FLOPs ratio at real length, from the method's soft decisions and the
  backbone's fvcore per-layer costs (``flops.FlopsCounter.expected_ratio``: one FLOPs model, the
  one the callback measures with), held at ``protocol.target_flops`` by one constraint
  (``FlopsTarget``), ramped in from 1 over ``protocol.target_warmup`` of training; the gate's
  sparsity term and Transkimmer's skim loss give way to it; static picks the schedule that meets
  it on the training rows and is fine-tuned under it;
- **steps and selection**: the budget's ``train.*`` for every method; the result is the best
  validation whose measured FLOPs ratio meets the target (+ ``protocol.selection_epsilon``),
  ToP's rule.

``protocol=paper`` keeps each paper's recipe (the gate and Transkimmer from the pretrained encoder
with their regularizer weights; ToP with its own target; static evaluated, not trained).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from tokprune.core.data import ROW
from tokprune.core.encoder import received_attention
from tokprune.methods.checkpoint import FrozenReference

SHARED, PAPER = "shared", "paper"


def is_shared(cfg: DictConfig) -> bool:
    """Whether ``cfg`` trains under ``protocol=shared`` (configs written before protocols: paper)."""
    return cfg.get("protocol", {}).get("name", PAPER) == SHARED


@dataclass(frozen=True)
class FlopsTarget:
    """A FLOPs ratio (real length) to hold, how it ramps in, how it is held and how it selects."""

    ratio: float  # the target FLOPs ratio at real length
    warmup: float  # fraction of training over which the target ramps 1 -> ratio
    constraint: str  # lagrangian | quadratic
    weight: float  # constraint=quadratic's weight
    multiplier_lr: float  # constraint=lagrangian's multipliers' AdamW lr
    epsilon: float  # selection: a validation meets the target at measured ratio <= ratio + epsilon

    @classmethod
    def of_protocol(cls, cfg: DictConfig) -> FlopsTarget:
        p = cfg.protocol
        return cls(
            float(p.target_flops),
            float(p.target_warmup),
            str(p.constraint),
            float(p.constraint_weight),
            float(p.target_lr),
            float(p.selection_epsilon),
        )

    def at(self, ramp: float) -> float:
        """The target at ``ramp`` (0 at the start, 1 once warmed up): 1 -> ``ratio``."""
        return 1.0 - ramp * (1.0 - self.ratio)


@dataclass
class TeacherBatch:
    """The teacher's outputs for one batch."""

    logits: Tensor  # B x labels
    importance: Tensor  # B x N: attention received in its last layer (ToP's ranking target)


class TeacherOutputs:
    """A frozen teacher's outputs per batch: looked up by the batch's ``row`` ids in a table made
    once per teacher checkpoint and training set (``cache``), else from a live forward."""

    def __init__(self, teacher: FrozenReference, cache: dict[str, Tensor] | None = None):
        self.teacher, self.cache = teacher, cache

    def live(self, batch: dict) -> TeacherBatch:
        last = self.teacher.module.encoder.num_layers - 1
        logits, out = self.teacher(batch, hard=False, attentions=(last,))  # the other layers run fused
        return TeacherBatch(logits, received_attention(out.attentions[-1], out.padding))

    def __call__(self, batch: dict) -> TeacherBatch:
        if self.cache is None or ROW not in batch:
            return self.live(batch)
        rows = batch[ROW].to(self.cache["logits"].device)
        width = batch["input_ids"].shape[1]
        return TeacherBatch(self.cache["logits"][rows], self.cache["importance"][rows, :width])

    def to(self, device) -> TeacherOutputs:
        self.teacher.to(device)
        if self.cache is not None:
            self.cache = {k: v.to(device) for k, v in self.cache.items()}
        return self

    def build_cache(self, dataset, collate, batch_size: int, max_length: int) -> None:
        """Compute (or read back) the outputs of every row of ``dataset``, a tokenised training set
        whose rows carry ``row`` ids 0..R-1. The file sits beside the teacher's checkpoint, named by
        a hash of the checkpoint's bytes and the rows' token ids, so a changed checkpoint or
        training set never reads stale outputs; an unwritable folder just skips the file."""
        key = self._key(dataset)
        path = self.teacher.path.parent / f"teacher-outputs-{key}.pt"
        if path.is_file():
            try:
                self.cache = torch.load(path, map_location="cpu", weights_only=True)
                return
            except Exception:  # a half-written file from a killed run: compute it again
                pass
        rows = len(dataset)
        logits = importance = None
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            out = self.live({k: v for k, v in batch.items()})
            index = batch[ROW]
            if logits is None:
                logits = torch.zeros(rows, out.logits.shape[-1])
                importance = torch.zeros(rows, max_length)
            logits[index] = out.logits.float().cpu()
            importance[index, : out.importance.shape[1]] = out.importance.float().cpu()
        self.cache = {"logits": logits, "importance": importance}
        try:
            partial = path.with_suffix(".tmp")
            torch.save(self.cache, partial)
            partial.replace(path)
        except OSError:
            pass

    def _key(self, dataset) -> str:
        digest = hashlib.sha256(_file_digest(self.teacher.path).encode())
        for column in ("input_ids", "token_type_ids"):
            if column in dataset.column_names:
                for ids in dataset.with_format(None)[column]:
                    digest.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes() + b"|")
        return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
