"""The token-pruning callback: FLOPs and kept tokens per layer, for any method.

It reads only the ``EncoderOutput`` that a step returns under ``"encoder"``; it never knows
which method it observes. FLOPs are fvcore lookups (see ``core.flops``), so counting every
step costs microseconds after each length has been traced once.

Logged (through the Trainer's logger; ``train/`` every step, ``val/`` per epoch):
``flops`` (summed over the examples), ``flops_ratio_real`` (vs the same examples unpruned),
``flops_ratio_padded`` (vs every example unpruned at the task's max length), and per layer
``flops/layer_<l>`` and ``kept_fraction/layer_<l>`` (mean over examples of kept / real tokens).

Several processes (``train.devices=2 train.strategy=ddp``): each validates its share of the
dev set, so the ``val/`` sums (FLOPs, kept fractions, examples) are summed across processes
before the ratios are taken, and every process logs the values of the whole dev set. Lightning's
``DistributedSampler`` pads a dev set that does not divide by the number of processes with
repeated rows, which are then counted twice. ``train/`` values stay per process (the logged
ones are rank 0's batch): reducing them would add a collective to every step.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from tokprune.core.encoder import EncoderOutput
from tokprune.core.flops import BatchFlops, FlopsCounter

# Lightning asks for sync_dist=True on epoch-level values in DDP; ours are summed across
# processes before they are logged, and averaging them again would only cost a collective.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/(flops|kept_fraction)")


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
        zeros = torch.zeros(pl_module.encoder.num_layers, dtype=torch.float64)  # same shape on every process
        self._val = {
            "pruned": 0.0,
            "real": 0.0,
            "padded": 0.0,
            "per_layer": zeros,
            "kept": zeros.clone(),
            "examples": 0,
        }

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        out = outputs["encoder"] if isinstance(outputs, dict) else None
        if out is None:
            return
        flops, kept = self._measure(out)
        acc = self._val
        acc["pruned"] += flops.pruned
        acc["real"] += flops.unpruned_real
        acc["padded"] += flops.unpruned_padded
        acc["per_layer"] += flops.per_layer
        acc["kept"] += kept
        acc["examples"] += out.hidden.shape[0]

    def on_validation_epoch_end(self, trainer, pl_module):
        """Sum every process's share (one collective; nothing on one process), then take ratios."""
        acc = self._val
        if not acc:
            return
        totals = torch.tensor([acc["pruned"], acc["real"], acc["padded"], acc["examples"]], dtype=torch.float64)
        sums = torch.cat([totals, acc["per_layer"], acc["kept"]]).to(pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum").cpu()  # a process with no batch joins too
        (pruned, real, padded, examples), (per_layer, kept) = sums[:4].tolist(), sums[4:].chunk(2)
        if examples:
            pl_module.log_dict(self._metrics("val", pruned, real, padded, per_layer, kept, examples))
