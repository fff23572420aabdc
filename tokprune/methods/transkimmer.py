"""``method=transkimmer``: learned token skimming (Guan et al., ACL 2022, arXiv 2205.07324).

Before each layer a small predictor reads every token's hidden state and decides keep or
skim. Training samples the decision with straight-through Gumbel-softmax, so the task loss
(through the soft rule's key weighting and forward-to-output) and the skim loss both reach
the predictors; evaluation takes the argmax, so results are deterministic (ours: the
reference samples at evaluation too). The encoder makes masks cumulative, pins [CLS] and
drops padding, and in eval mode removes skimmed tokens for real (hard mode).

Reference facts (ChandlerGuan/Transkimmer, ``src/module/modeling_transkimer.py``,
``BertEncoder``): one predictor per layer for *every* layer, the first one applied to the
embedding output before layer 0 (hence ``first_skim_layer: 0``); the predictor's hidden
Linear gets BERT's ``_init_weights`` (N(0, initializer_range), bias 0), its last Linear the
keep-biased init of ``modeling_skim_predictor.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tokprune.checkpoint import load_weights
from tokprune.encoder import EncoderOutput, PruneContext, Pruner
from tokprune.errors import UsageError
from tokprune.methods.base import PruningModule

SKIM, KEEP = 0, 1  # indices of the predictor's two logits
DECISION_INIT_STD = 0.02  # std of the last Linear's weights and biases at init (the reference's)


class SkimPredictor(nn.Module):
    """``LayerNorm -> Linear(d,d) -> LayerNorm -> GELU -> Linear(d,2)``: keep/skim logits per token.

    The last Linear starts with bias ~ (-keep_bias, +keep_bias) so every token is kept at the
    start of training and the backbone's accuracy is not hurt before the predictors learn.
    Initialised here, in a module that no ``PreTrainedModel._init_weights`` ever visits.
    """

    def __init__(self, width: int, keep_bias: float = 5.0, hidden_init_std: float = 0.02):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 2)
        )
        hidden, last = self.net[1], self.net[4]
        with torch.no_grad():
            hidden.weight.normal_(0.0, hidden_init_std)
            hidden.bias.zero_()
            last.weight.normal_(0.0, DECISION_INIT_STD)
            last.bias[KEEP].normal_(keep_bias, DECISION_INIT_STD)
            last.bias[SKIM].normal_(-keep_bias, DECISION_INIT_STD)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)


class SkimPruner(Pruner):
    """One ``SkimPredictor`` per layer from ``first_skim_layer`` on; earlier layers keep all."""

    needs_attention = False  # decisions read hidden states only

    def __init__(self, width: int, num_layers: int, first_skim_layer: int, tau: float,
                 keep_bias: float, hidden_init_std: float):
        super().__init__()
        if not 0 <= first_skim_layer < num_layers:
            raise UsageError(f"method.first_skim_layer must be in 0..{num_layers - 1}, not {first_skim_layer}")
        self.first_skim_layer, self.tau = first_skim_layer, tau
        self.predictors = nn.ModuleList(
            SkimPredictor(width, keep_bias, hidden_init_std) for _ in range(first_skim_layer, num_layers)
        )

    def cost_module(self, layer: int) -> nn.Module | None:
        return self.predictors[layer - self.first_skim_layer] if layer >= self.first_skim_layer else None

    def forward(self, ctx: PruneContext) -> Tensor:
        if ctx.layer < self.first_skim_layer:
            return ctx.keep
        # Only tokens still alive are scored (what the FLOPs counter charges); the rest stay dropped.
        hidden, live = ctx.hidden, ctx.live
        logits = hidden.new_zeros(*live.shape, 2)
        logits[live] = self.predictors[ctx.layer - self.first_skim_layer](hidden[live])
        if self.training:  # a binary sample whose gradient is the soft sample's (straight-through)
            return F.gumbel_softmax(logits, tau=self.tau, hard=True)[..., KEEP]
        return (logits[..., KEEP] > logits[..., SKIM]).to(hidden.dtype)


class Method(PruningModule):
    """Task loss + ``skim_lambda`` x the mean fraction of real tokens kept per layer."""

    reference_soft_rule = "post_softmax"  # method.train_attention=reference: probs x mask, no renormalising

    def prepare_fit(self) -> None:
        """``method.init_checkpoint``: start from a fine-tuned run (e.g. ``method=none``), its
        weights but never its pruner, so the predictors keep their keep-biased init."""
        if self.cfg.method.init_checkpoint:
            load_weights(self, self.cfg.method.init_checkpoint, "method.init_checkpoint")

    def build_pruner(self) -> Pruner:
        m, config = self.cfg.method, self.encoder.config
        return SkimPruner(config.hidden_size, self.encoder.num_layers, m.first_skim_layer, m.tau,
                          keep_bias=m.keep_bias, hidden_init_std=config.initializer_range)

    def losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """Task loss + ``lambda * (1/L) sum_l mean_b(sum_j m_lj / n_b)`` on the effective (cumulative) masks.

        Divided by the real length n_b (ours; the reference divides by the padded length), so
        the loss does not depend on how a batch happens to be padded.
        """
        kept = torch.stack([keep.sum(1) for keep in out.keep])  # L x B, carries straight-through grads
        kept_fraction = (kept / out.lengths.clamp(min=1)).mean()
        return {**super().losses(logits, out, batch), "skim_loss": self.cfg.method.skim_lambda * kept_fraction}

    def own_parameter_groups(self) -> list[dict]:
        """With ``method.predictor_lr`` set, the predictors get that lr (ours); else train.lr."""
        predictor_lr = self.cfg.method.predictor_lr
        if predictor_lr is None:
            return []
        return self.decay_groups(self.pruner.parameters(), self.cfg.train.weight_decay, lr=float(predictor_lr))
