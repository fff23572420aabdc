"""``method=static``: a fixed top-k keep schedule on the fine-tuned baseline, nothing learned.

The reference point that tells how much the learned methods buy (PoWER-BERT / SpAtten style,
ours in its details): before each layer ``l >= first_pruned_layer`` keep the
``ceil(f_l * n)`` tokens of an example (n = its real length, [CLS] always among them) that
received the most attention in the previous layer, with

    f_l = keep_last ** ((l - first_pruned_layer + 1) / (L - first_pruned_layer))

a geometric decay that reaches ``keep_last`` at the last layer. Masks are binary, so
training (optional: ``finetune: true``) and evaluation compute the same thing.

The weights are the unpruned baseline's (``init_checkpoint``; left empty, the baseline of the
same task, model, budget and seed is found in the MLflow store or trained once). With
``finetune: false`` (default) a run is one evaluation: no training step, so a sweep trial
costs a dev pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokprune.checkpoint import load_weights
from tokprune.encoder import PruneContext, Pruner
from tokprune.errors import UsageError
from tokprune.methods.base import PruningModule


class TopKSchedule(Pruner):
    """Keep the top ``fraction[l]`` of each example's real tokens by received attention."""

    def __init__(self, fractions: dict[int, float]):
        super().__init__()
        self.fractions = fractions

    @classmethod
    def geometric(cls, num_layers: int, first_pruned_layer: int, keep_last: float) -> "TopKSchedule":
        if not 1 <= first_pruned_layer < num_layers:
            raise UsageError(f"method.first_pruned_layer must be in 1..{num_layers - 1} (layer 0 has no previous "
                             f"attention to rank by), not {first_pruned_layer}")
        span = num_layers - first_pruned_layer
        return cls({layer: keep_last ** ((layer - first_pruned_layer + 1) / span)
                    for layer in range(first_pruned_layer, num_layers)})

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
    """The baseline's weights under a fixed schedule; fine-tuned with it only if asked."""

    baseline_checkpoint_key = "method.init_checkpoint"

    def build_pruner(self) -> Pruner:
        m = self.cfg.method
        return TopKSchedule.geometric(self.encoder.num_layers, m.first_pruned_layer, m.keep_last)

    @property
    def trains(self) -> bool:
        return bool(self.cfg.method.finetune)

    def prepare_fit(self) -> None:
        load_weights(self, self.cfg.method.init_checkpoint, "method.init_checkpoint")

    def state_tables(self) -> dict[str, str]:
        rows = [f"{layer}\t{fraction:.4f}" for layer, fraction in sorted(self.pruner.fractions.items())]
        return {"schedule.tsv": "layer\tkept_fraction_of_real_tokens\n" + "\n".join(rows) + "\n"}

