"""``method=gate``: Dynamic BERT's trainable gates with a bi-modal regularizer (Jeong & Kwak,
arXiv 2102.09727), as tokprune reads it.

The paper's full text and code are not public. What it states: gates on the input tokens of
each layer, learned in one fine-tuning stage; a "mask matching module" that sorts the tokens
and matches each to a learned mask; a sparsity regularizer plus a bi-modal one (after
Srinivas et al. 2017, penalty ``g(1-g)``). Everything else is ours, closest to PoWER-BERT
(IBM/PoWER-BERT: rank-indexed retention parameters clipped to [0,1], init 1, an L1 penalty
weighted by layer, their own lr, then hard extraction of the top tokens by attention):

- mask matching (ours): before layer l, live tokens are sorted by the attention they received
  in layer l-1, ``[CLS]`` pinned first, dropped tokens and padding last; the token at rank r
  gets gate ``g_l[r]`` (``method.ranks: absolute``) or ``g_l[floor(r / n_live * bins)]``
  (``ranks: bins``, length-normalised). Layer 0 has no previous attention, so gating starts
  at ``method.first_gated_layer`` (default 1);
- gates (ours): raw parameters clipped to [0,1] after every optimiser step, init 1
  (``parametrisation: clipped``, PoWER-BERT), or ``sigmoid(theta)`` (``sigmoid``; near 1 it
  has almost no gradient), with their own lr and no weight decay;
- training: the gate value is the token's mask, made cumulative by the encoder and applied
  with its hard-equivalent soft rule, so binary gates in soft mode equal hard removal; with
  ``straight_through: true`` (ours) the forward mask is the thresholded gate and the gradient
  reaches the gate value (straight-through), so training computes exactly what hard mode does
  rather than relying on the bi-modal term to close the gap;
- inference: a rank is kept iff its gate > ``threshold`` (``inference: threshold``), or the
  top ``floor(sum_r g_l[r])`` ranks (``top_sum``; with bins, that share of the live tokens), or
  (``expected``, ours; with ``straight_through`` also the training forward) each example keeps
  ``round(sum of its live tokens' gate values)`` tokens, those with the highest gate values: the
  kept count is the expected one, so the shared FLOPs target, held on the gate values, holds on
  what is computed, and a target no longer makes every gate of a layer cross the threshold in the
  same step (with ``threshold`` under protocol=shared, SST-2 cpu, target 0.45: [CLS] only from
  layer 3 on and the majority class).

Loss under ``protocol=paper`` (``w_l = (l+1)/L``, ``rho`` ramping 0 -> 1 from ``bimodal_start`` over
``bimodal_ramp`` of training, because at g = 1 the bi-modal gradient holds gates open)::

    task + lambda_sparse * sum_l w_l * mean_r g_l[r] + rho * lambda_bimodal * sum_l mean_r g_l[r] (1 - g_l[r])

Under ``protocol=shared`` (``methods.protocol``) the sparsity term gives way to the shared FLOPs
target, whose expected ratio is the gate values summed per layer (the expected kept tokens) in the
backbone's per-layer costs; that removes ``lambda_sparse``'s cliff. The task term is the shared
distillation blend; the bi-modal term stays (it makes the gates binary, i.e. soft = hard)::

    (1 - w) task + w KD + rho * lambda_bimodal * sum_l mean_r g(1 - g) + FLOPs constraint
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokprune.core.encoder import EncoderOutput, PruneContext, Pruner
from tokprune.errors import UsageError
from tokprune.methods.base import PruningModule

BIMODAL_EDGE = 0.1  # a gate below 0.1 or above 0.9 counts as decided


def keep_expected_count(soft: Tensor, live: Tensor) -> Tensor:
    """B x N binary keep: [CLS] and, of the other live tokens, the ``round(sum of their gate
    values)`` with the highest gate values (ties: the more important rank). The kept count is the
    expected one (``Method.expected_kept``), so a FLOPs target held on the gate values holds on what
    is computed."""
    live = live.to(torch.bool)
    count = 1 + (soft[:, 1:] * live[:, 1:]).sum(1).round()
    score = soft.detach().masked_fill(~live, -1.0)  # gate values are in [0, 1]: dead tokens last
    score = torch.cat([torch.full_like(score[:, :1], 2.0), score[:, 1:]], dim=1)  # [CLS] first
    order = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return (order < count[:, None]).to(soft.dtype)


class GatePruner(Pruner):
    """One gate vector per gated layer, indexed by importance rank (or rank bin)."""

    def __init__(
        self,
        num_layers: int,
        slots: int,
        first_gated_layer: int,
        ranks: str,
        parametrisation: str,
        sigmoid_init: float,
        threshold: float,
        inference: str,
        straight_through: bool = False,
    ):
        super().__init__()
        self.straight_through = straight_through
        if not 1 <= first_gated_layer < num_layers:
            raise UsageError(
                f"method.first_gated_layer must be in 1..{num_layers - 1} (layer 0 has no "
                f"previous attention to rank by), not {first_gated_layer}"
            )
        self.first, self.ranks, self.parametrisation = first_gated_layer, ranks, parametrisation
        self.threshold, self.inference = threshold, inference
        init = sigmoid_init if parametrisation == "sigmoid" else 1.0
        self.weights = nn.Parameter(torch.full((num_layers - first_gated_layer, slots), float(init)))
        self.soft_proposals: dict[int, Tensor] = {}  # per layer, the last training forward's gate value per token

    def gates(self) -> Tensor:
        """(gated layers) x slots gate values in [0, 1]."""
        return self.weights.sigmoid() if self.parametrisation == "sigmoid" else self.weights

    def clip_(self) -> None:
        if self.parametrisation == "clipped":
            with torch.no_grad():
                self.weights.clamp_(0.0, 1.0)

    def wants_attention(self, layer: int) -> bool:
        return layer >= self.first

    def decides(self, layer: int) -> bool:
        return layer >= self.first

    def slots_of(self, ranks: Tensor, live_count: Tensor) -> Tensor:
        """B x N gate index of each rank: the rank itself, or its length-normalised bin."""
        slots = self.weights.shape[1]
        if self.ranks == "bins":
            ranks = torch.div(ranks * slots, live_count.clamp(min=1)[:, None], rounding_mode="floor")
        return ranks.clamp(max=slots - 1)

    def forward(self, ctx: PruneContext) -> Tensor:
        if ctx.layer < self.first:
            return ctx.keep
        ranks = ctx.importance_ranks()
        live_count = ctx.live.sum(1)
        gates = self.gates()[ctx.layer - self.first]
        if self.training:
            soft = gates[self.slots_of(ranks, live_count)]
            self.soft_proposals[ctx.layer] = soft  # the gate values, for the expected kept count
            if not self.straight_through:
                return soft
            binary = (
                keep_expected_count(soft, ctx.live)
                if self.inference == "expected"
                else (soft > self.threshold).to(soft.dtype)
            )
            return binary + (soft - soft.detach())  # exactly binary forward, the gate values' gradient
        if self.inference == "threshold":
            return (gates[self.slots_of(ranks, live_count)] > self.threshold).to(ctx.keep.dtype)
        if self.inference == "expected":
            return keep_expected_count(gates[self.slots_of(ranks, live_count)], ctx.live).to(ctx.keep.dtype)
        total = gates.sum()  # top_sum: keep the top floor(sum g) ranks (a share of the live tokens with bins)
        if self.ranks == "bins":
            count = torch.floor(total / gates.numel() * live_count)
        else:
            count = torch.floor(total).expand_as(live_count)
        return (ranks < count[:, None]).to(ctx.keep.dtype)


class Method(PruningModule):
    """Task loss + layer-weighted gate sparsity (or the FLOPs target) + a ramped-in bi-modal term."""

    follows_protocol = learns_decisions = True

    def build_pruner(self) -> Pruner:
        m = self.cfg.method
        slots = self.cfg.task.max_length if m.ranks == "absolute" else m.bins
        return GatePruner(
            self.encoder.num_layers,
            int(slots),
            m.first_gated_layer,
            m.ranks,
            m.parametrisation,
            m.sigmoid_init,
            m.threshold,
            m.inference,
            m.straight_through,
        )

    def layer_weights(self) -> Tensor:
        """``w_l = (l+1)/L`` of each gated layer: later layers cost more to keep."""
        layers = torch.arange(self.pruner.first, self.encoder.num_layers, dtype=torch.float32)
        return (layers + 1) / self.encoder.num_layers

    def bimodal_ramp(self) -> float:
        m = self.cfg.method
        if self.progress < m.bimodal_start:
            return 0.0
        return 1.0 if m.bimodal_ramp <= 0 else min(1.0, (self.progress - m.bimodal_start) / m.bimodal_ramp)

    def expected_kept(self, out: EncoderOutput) -> Tensor:
        """L x B expected kept tokens: in a gated layer [CLS] plus the gate values of the tokens the
        previous layer computed (not the thresholded forward of ``straight_through``); other layers
        as computed. With ``inference=expected`` this is the kept count up to rounding. A target held
        on thresholded counts sees no progress while gates drift towards the threshold and then every
        rank of a layer crosses it in the same step (Adam moves all gates at ~gate_lr): on SST-2 (cpu
        budget, target 0.45) the counts fell to [CLS] only and the model to the majority class."""
        proposals = self.pruner.soft_proposals if self.pruner.training and not out.hard else {}
        previous, counts = out.padding, []
        for layer, used in enumerate(out.keep):
            soft = proposals.get(layer)
            if soft is None or soft.shape != used.shape:  # not gated (or no training forward): as computed
                counts.append(used.sum(1))
            else:
                counts.append(1 + (soft[:, 1:] * (previous[:, 1:] > 0)).sum(1))
            previous = used
        return torch.stack(counts)

    def pruning_losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        m, gates = self.cfg.method, self.pruner.gates()
        terms = {"bimodal_loss": self.bimodal_ramp() * m.lambda_bimodal * (gates * (1 - gates)).mean(1).sum()}
        if self.flops_target is None:  # protocol=paper: the sparsity term sets the operating point
            sparsity = (self.layer_weights().to(gates) * gates.mean(1)).sum()
            terms["sparsity_loss"] = m.lambda_sparse * sparsity
        return terms

    def own_parameter_groups(self) -> list[dict]:
        return [{"params": [self.pruner.weights], "lr": float(self.cfg.method.gate_lr), "weight_decay": 0.0}]

    def after_optimizer_step(self) -> None:
        self.pruner.clip_()

    def bimodal_share(self) -> float:
        gates = self.pruner.gates().detach()
        return float(((gates < BIMODAL_EDGE) | (gates > 1 - BIMODAL_EDGE)).float().mean())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/gates_bimodal_share", self.bimodal_share())
        self.log("val/gates_mean", float(self.pruner.gates().detach().mean()))

    def state_tables(self) -> dict[str, str]:
        """The gate values per layer (rows) and rank or bin (columns), as a TSV artifact."""
        gates = self.pruner.gates().detach().cpu()
        header = "layer\t" + "\t".join(str(i) for i in range(gates.shape[1]))
        rows = [
            f"{self.pruner.first + i}\t" + "\t".join(f"{g:.3f}" for g in row.tolist()) for i, row in enumerate(gates)
        ]
        return {"gates.tsv": "\n".join([header, *rows]) + "\n"}
