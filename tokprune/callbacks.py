"""The token-pruning callback: FLOPs and kept tokens per layer, for any method.

It reads only the ``EncoderOutput`` that a step returns under ``"encoder"``; it never knows
which method it observes. FLOPs are fvcore lookups (see ``flops.py``), so counting every
step costs microseconds after each length has been traced once.

Logged (through the Trainer's logger; ``train/`` every step, ``val/`` per epoch):
``flops`` (summed over the examples), ``flops_ratio_real`` (vs the same examples unpruned),
``flops_ratio_padded`` (vs every example unpruned at the task's max length), and per layer
``flops/layer_<l>`` and ``kept_fraction/layer_<l>`` (mean over examples of kept / real tokens).
"""

from __future__ import annotations

import lightning as L
import torch

from tokprune.encoder import EncoderOutput
from tokprune.flops import BatchFlops, FlopsCounter


class TokenPruningCallback(L.Callback):
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.counter: FlopsCounter | None = None
        self._val: dict[str, torch.Tensor | float] = {}

    def setup(self, trainer, pl_module, stage):
        if self.counter is None or self.counter.encoder is not pl_module.encoder:
            self.counter = FlopsCounter(pl_module.encoder, pl_module.pruner)  # a warm cache survives refits

    def _measure(self, out: EncoderOutput) -> tuple[BatchFlops, torch.Tensor]:
        fractions = out.kept_counts().double() / out.lengths.detach().clamp(min=1).double()
        return self.counter.batch(out, self.max_length), fractions.sum(1).cpu()

    @staticmethod
    def _metrics(prefix: str, pruned, real, padded, per_layer, kept_sum, examples) -> dict[str, float]:
        metrics = {
            f"{prefix}/flops": pruned / examples,
            f"{prefix}/flops_ratio_real": pruned / real,
            f"{prefix}/flops_ratio_padded": pruned / padded,
        }
        for layer, (flops, kept) in enumerate(zip(per_layer.tolist(), kept_sum.tolist())):
            metrics[f"{prefix}/flops/layer_{layer}"] = flops / examples
            metrics[f"{prefix}/kept_fraction/layer_{layer}"] = kept / examples
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out = outputs["encoder"] if isinstance(outputs, dict) else None
        if out is None:
            return
        flops, kept = self._measure(out)
        examples = out.hidden.shape[0]
        metrics = self._metrics(
            "train", flops.pruned, flops.unpruned_real, flops.unpruned_padded, flops.per_layer, kept, examples
        )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=examples)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._val = {"pruned": 0.0, "real": 0.0, "padded": 0.0, "per_layer": 0.0, "kept": 0.0, "examples": 0}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        out = outputs["encoder"] if isinstance(outputs, dict) else None
        if out is None:
            return
        flops, kept = self._measure(out)
        acc = self._val
        acc["pruned"] += flops.pruned
        acc["real"] += flops.unpruned_real
        acc["padded"] += flops.unpruned_padded
        acc["per_layer"] = acc["per_layer"] + flops.per_layer
        acc["kept"] = acc["kept"] + kept
        acc["examples"] += out.hidden.shape[0]

    def on_validation_epoch_end(self, trainer, pl_module):
        acc = self._val
        if not acc or not acc["examples"]:
            return
        metrics = self._metrics(
            "val", acc["pruned"], acc["real"], acc["padded"], acc["per_layer"], acc["kept"], acc["examples"]
        )
        pl_module.log_dict(metrics)
