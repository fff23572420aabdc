"""``method=static``: a fixed top-k keep schedule on the fine-tuned baseline, nothing learned.

The reference point that tells how much the learned methods buy (PoWER-BERT / SpAtten style,
ours in its details): before each layer ``l >= first_pruned_layer`` keep the
``ceil(f_l * n)`` tokens of an example (n = its real length, [CLS] always among them) that
received the most attention in the previous layer, with

    f_l = keep_last ** ((l - first_pruned_layer + 1) / (L - first_pruned_layer))

a geometric decay that reaches ``keep_last`` at the last layer. Masks are binary, so
training (optional: ``finetune: true``) and evaluation compute the same thing.

The weights are the unpruned baseline's (``init_checkpoint``, or ``protocol.baseline_checkpoint``;
left empty, the baseline of the same task, model, budget and seed is found in the MLflow store or
trained once).

- ``protocol=shared`` (default): ``keep_last`` is the largest (to 1e-4) whose schedule meets
  ``protocol.target_flops`` on the training rows (the FLOPs ratio at real length, measured with
  the backbone's fvcore costs), and the weights are fine-tuned under that fixed schedule with the
  shared distillation: the honest answer to "what does learning the decisions buy" at the same
  target. The chosen ``keep_last`` is written into the run's config (so its checkpoint rebuilds
  the same schedule);
- ``protocol=paper``: ``keep_last`` as given; with ``finetune: false`` (default) a run is one
  evaluation, no training step, so a sweep trial costs a dev pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokprune.core.encoder import PruneContext, Pruner
from tokprune.errors import UsageError
from tokprune.methods.base import PruningModule


class TopKSchedule(Pruner):
    """Keep the top ``fraction[l]`` of each example's real tokens by received attention."""

    def __init__(self, fractions: dict[int, float]):
        super().__init__()
        self.fractions = fractions

    @classmethod
    def geometric(cls, num_layers: int, first_pruned_layer: int, keep_last: float) -> TopKSchedule:
        if not 1 <= first_pruned_layer < num_layers:
            raise UsageError(
                f"method.first_pruned_layer must be in 1..{num_layers - 1} (layer 0 has no previous "
                f"attention to rank by), not {first_pruned_layer}"
            )
        span = num_layers - first_pruned_layer
        return cls(
            {
                layer: keep_last ** ((layer - first_pruned_layer + 1) / span)
                for layer in range(first_pruned_layer, num_layers)
            }
        )

    def wants_attention(self, layer: int) -> bool:
        return layer in self.fractions

    def decides(self, layer: int) -> bool:
        return layer in self.fractions

    def forward(self, ctx: PruneContext) -> Tensor:
        if ctx.layer not in self.fractions:
            return ctx.keep
        # [CLS] ranks first: the encoder keeps it anyway, so it counts among the k
        target = torch.ceil(ctx.lengths * self.fractions[ctx.layer]).long().clamp(min=1)
        return (ctx.importance_ranks() < target[:, None]).to(ctx.keep.dtype)


class Method(PruningModule):
    """The baseline's weights under a fixed schedule; fine-tuned with it under protocol=shared or
    when asked."""

    follows_protocol = True
    paper_init_key = paper_baseline_checkpoint_key = "method.init_checkpoint"

    def build_pruner(self) -> Pruner:
        m = self.cfg.method
        return TopKSchedule.geometric(self.encoder.num_layers, m.first_pruned_layer, m.keep_last)

    @property
    def trains(self) -> bool:
        return self.shared or bool(self.cfg.method.finetune)

    def prepare_fit(self, datamodule=None) -> None:
        if self.shared and datamodule is not None:
            lengths = torch.tensor([len(ids) for ids in datamodule.splits["train"].with_format(None)["input_ids"]])
            keep_last = self.keep_last_for(float(self.cfg.protocol.target_flops), lengths)
            self.cfg.method.keep_last = keep_last
            self.pruner = self.build_pruner()
        super().prepare_fit(datamodule)

    def flops_ratio(self, keep_last: float, lengths: Tensor) -> float:
        """The schedule's FLOPs ratio at real length on examples of these lengths."""
        schedule = TopKSchedule.geometric(self.encoder.num_layers, self.cfg.method.first_pruned_layer, keep_last)
        counts = torch.stack(
            [
                torch.ceil(lengths * schedule.fractions[layer]).clamp(min=1)
                if layer in schedule.fractions
                else lengths.double()
                for layer in range(self.encoder.num_layers)
            ]
        ).double()
        return float(self.flops_model().expected_ratio(counts, lengths))

    def keep_last_for(self, target: float, lengths: Tensor, tolerance: float = 1e-4) -> float:
        """The largest ``keep_last`` whose schedule's FLOPs ratio on ``lengths`` is <= ``target``
        (bisection: the ratio grows with keep_last); the smallest tried when none meets it."""
        low, high = tolerance, 1.0
        if self.flops_ratio(high, lengths) <= target:
            return high
        while high - low > tolerance:
            middle = (low + high) / 2
            low, high = (middle, high) if self.flops_ratio(middle, lengths) <= target else (low, middle)
        return round(low, 6)

    def state_tables(self) -> dict[str, str]:
        rows = [f"{layer}\t{fraction:.4f}" for layer, fraction in sorted(self.pruner.fractions.items())]
        return {"schedule.tsv": "layer\tkept_fraction_of_real_tokens\n" + "\n".join(rows) + "\n"}
