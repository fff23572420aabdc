"""``method=transkimmer``: learned token skimming (Guan et al., ACL 2022, arXiv 2205.07324).

Before each layer a small predictor reads every token's hidden state and decides keep or
skim. Training samples the decision with straight-through Gumbel-softmax (the reference's; or,
``train_decisions: argmax``, takes evaluation's argmax), so the task loss
(through the soft rule's key weighting and forward-to-output) and the skim loss both reach
the predictors; evaluation takes the argmax, so results are deterministic (ours: the
reference samples at evaluation too). The encoder makes masks cumulative, pins [CLS] and
drops padding, and in eval mode removes skimmed tokens for real (hard mode).

Reference facts (ChandlerGuan/Transkimmer, ``src/module/modeling_transkimer.py``,
``BertEncoder``): one predictor per layer for *every* layer, the first one applied to the
embedding output before layer 0 (hence ``first_skim_layer: 0``); the predictor's hidden
Linear gets BERT's ``_init_weights`` (N(0, initializer_range), bias 0), its last Linear the
keep-biased init of ``modeling_skim_predictor.py``; the skim loss
``lambda * (1/L) sum_l mean_b(sum_j m_lj) / N_padded`` on the cumulative masks.

Ours, each an option (conf/method/transkimmer.yaml); by default off or as before, but for the training rule:

- ``train_decisions``: ``sampled`` (default, the reference's Gumbel noise) or ``argmax``: the
  training forward takes evaluation's decisions, the gradient still softmax(logits / tau)'s.
  Sampled training with argmax evaluation is a mismatch of its own: predictors that end below
  p(keep) = 1/2 for every token keep some in training and none at evaluation (SST-2, target
  0.45: 25% sampled at the end of training, [CLS] only from layer 1 on in hard mode; README),
  so with argmax the kept fraction trained on is the one evaluated;
- ``train_attention: renormalised`` (default): train with the encoder's hard-equivalent soft rule,
  so what is trained is what hard mode evaluates; ``reference``: the paper's probabilities x mask
  without renormalising, which hard removal does not compute;
- ``skim_norm``: ``real`` (default) divides each example's kept count by its real length n_b;
  ``padded`` by the padded length N, padding and [CLS] included (the reference's);
- ``skim_target``: hold the kept fraction at a target instead of the linear skim loss, by ToP's
  Lagrangian (``skim_target_mode: lagrangian``, multipliers ascending at ``target_lr``; shared
  code: ``tokprune.methods.constraints``) or ``skim_lambda * (k - t)^2`` (``quadratic``);
- ``skim_warmup``: the skim weight (or the target's reduction 1 -> target) ramps from 0;
- ``skim_layer_weights`` (normalised to sum 1; null = uniform, the reference) and
  ``skim_loss_on``: ``cumulative`` (the reference: the loss on the effective masks, so the
  decision before layer l gets (L - l)/L of the gradient) or ``own``: layer l's term, same value,
  reaches only layer l's predictor (its proposal from its detached input, times the detached mask
  of the tokens alive before it), so the later, contextual predictors do their share;
- ``teacher_checkpoint`` / ``distill_weight`` w / ``temperature`` T: ``(1 - w) * task + w * KD``
  with ToP's logit distillation (``tokprune.methods.distill``; MSE to the teacher for regression).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokprune.core.encoder import EncoderOutput, PruneContext, Pruner
from tokprune.errors import UsageError
from tokprune.methods import constraints
from tokprune.methods.base import PruningModule

SKIM, KEEP = 0, 1  # indices of the predictor's two logits
DECISION_INIT_STD = 0.02  # std of the last Linear's weights and biases at init (the reference's)
CHOICES = {
    "skim_target_mode": ("lagrangian", "quadratic"),
    "skim_loss_on": ("cumulative", "own"),
    "skim_norm": ("real", "padded"),
    "train_decisions": ("sampled", "argmax"),
}
#: the options' defaults (conf/method/transkimmer.yaml), for checkpoints written before the keys existed
DEFAULTS = {
    "skim_target": None,
    "skim_target_mode": "lagrangian",
    "target_lr": 0.02,
    "skim_warmup": 0.0,
    "skim_layer_weights": None,
    "skim_loss_on": "cumulative",
    "skim_norm": "real",
    "teacher_checkpoint": None,
    "distill_weight": 0.5,
    "temperature": 2.0,
    "train_decisions": "sampled",
}


def gumbel_noise(logits: Tensor) -> Tensor:
    """Standard Gumbel noise of ``logits``' shape (drawn as ``F.gumbel_softmax`` draws it)."""
    return -torch.empty_like(logits).exponential_().log()


def straight_through(noisy_logits: Tensor, tau: float) -> Tensor:
    """``F.gumbel_softmax(logits, tau, hard=True)`` given ``logits + gumbel_noise(logits)``: the
    one-hot argmax forward, the gradient of ``softmax(noisy_logits / tau)``."""
    soft = (noisy_logits / tau).softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


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
    #: ``method.skim_loss_on=own``: in training, also record in ``own_proposals[layer]`` the same
    #: decision (same Gumbel noise, same value) computed from the *detached* hidden states, so a
    #: loss on it reaches only that layer's predictor (not earlier ones through its input)
    record_own: bool = False

    def __init__(
        self,
        width: int,
        num_layers: int,
        first_skim_layer: int,
        tau: float,
        keep_bias: float,
        hidden_init_std: float,
        sampled: bool = True,
    ):
        super().__init__()
        if not 0 <= first_skim_layer < num_layers:
            raise UsageError(f"method.first_skim_layer must be in 0..{num_layers - 1}, not {first_skim_layer}")
        self.first_skim_layer, self.tau, self.sampled = first_skim_layer, tau, sampled
        self.own_proposals: dict[int, Tensor] = {}  # record_own's, per layer; emptied by the loss that reads them
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
        predictor = self.predictors[ctx.layer - self.first_skim_layer]
        logits = hidden.new_zeros(*live.shape, 2)
        logits[live] = predictor(hidden[live])
        if self.training:  # a binary decision whose gradient is the soft one's (straight-through)
            gumbels = gumbel_noise(logits) if self.sampled else torch.zeros_like(logits)
            if self.record_own:
                own = hidden.new_zeros(*live.shape, 2)
                own[live] = predictor(hidden[live].detach())
                self.own_proposals[ctx.layer] = straight_through(own + gumbels, self.tau)[..., KEEP]
            return straight_through(logits + gumbels, self.tau)[..., KEEP]
        return (logits[..., KEEP] > logits[..., SKIM]).to(hidden.dtype)


class Method(PruningModule):
    """Task loss (or its blend with a teacher's logits) + a skim term on the kept fraction (or the
    shared FLOPs target)."""

    reference_soft_rule = "post_softmax"  # method.train_attention=reference: probs x mask, no renormalising
    follows_protocol = learns_decisions = True
    paper_init_key = "method.init_checkpoint"  # null: the pretrained backbone (the paper's start)

    def __init__(self, cfg, bert, task):
        super().__init__(cfg, bert, task)
        num_layers = self.encoder.num_layers
        for key, allowed in CHOICES.items():
            if self.option(key) not in allowed:
                raise UsageError(f"method.{key} must be one of {', '.join(allowed)}, not {self.option(key)!r}")
        weights = self.option("skim_layer_weights")
        weights = [1.0] * num_layers if weights is None else [float(w) for w in weights]
        if len(weights) != num_layers or min(weights) < 0 or sum(weights) <= 0:
            raise UsageError(
                f"method.skim_layer_weights must be {num_layers} non-negative weights (one per layer), "
                f"not all 0, or null; not {list(weights)}"
            )
        self.layer_weights = [w / sum(weights) for w in weights]  # uniform: the reference's 1/L
        if (
            not self.shared
            and self.option("skim_target") is not None
            and self.option("skim_target_mode") == "lagrangian"
        ):
            self.multipliers = constraints.multipliers()  # lambda1, lambda2; only then (no unused parameters)
        self.pruner.record_own = not self.shared and self.option("skim_loss_on") == "own"

    def option(self, key: str):
        """``method.<key>``; a key that a checkpoint written before it lacks reads as its default."""
        return self.cfg.method.get(key, DEFAULTS.get(key))

    def build_pruner(self) -> Pruner:
        m, config = self.cfg.method, self.encoder.config
        return SkimPruner(
            config.hidden_size,
            self.encoder.num_layers,
            m.first_skim_layer,
            m.tau,
            keep_bias=m.keep_bias,
            hidden_init_std=config.initializer_range,
            sampled=self.option("train_decisions") == "sampled",
        )

    # -- fitting (the start and the teacher: methods.base, by protocol) --------------------

    def distillation(self) -> tuple[float, float] | None:
        """protocol=paper with ``method.teacher_checkpoint``: ``distill_weight`` and ``temperature`` (ours)."""
        if self.shared:
            return super().distillation()
        return (float(self.option("distill_weight")), float(self.option("temperature"))) if self.teacher_key else None

    @property
    def paper_teacher_key(self) -> str | None:
        return "method.teacher_checkpoint" if self.option("teacher_checkpoint") else None

    def own_parameter_groups(self) -> list[dict]:
        """With ``method.predictor_lr`` set, the predictors get that lr (ours); else train.lr.
        protocol=paper, ``skim_target_mode=lagrangian``: the multipliers at ``method.target_lr``."""
        groups = []
        predictor_lr = self.cfg.method.predictor_lr
        if predictor_lr is not None:
            groups += self.decay_groups(self.pruner.parameters(), self.cfg.train.weight_decay, lr=float(predictor_lr))
        if self.flops_target is None and hasattr(self, "multipliers"):
            groups.append(constraints.constant_group([self.multipliers], self.option("target_lr")))
        return groups

    # -- the loss ------------------------------------------------------------------------

    def ramp(self) -> float:
        """``method.skim_warmup``: 0 at the first step, 1 from that fraction of training on."""
        return constraints.linear_ramp(self.progress, float(self.option("skim_warmup")))

    def target(self) -> float:
        """The kept fraction the target modes hold, ramping 1 -> ``skim_target`` over the warm-up."""
        return 1.0 - self.ramp() * (1.0 - float(self.option("skim_target")))

    def layer_masks(self, out: EncoderOutput) -> list[Tensor]:
        """Per layer, the B x N mask the skim term counts: the effective (cumulative) mask
        (``skim_loss_on=cumulative``), or the same values with the gradient of the layer's own
        decision alone (``own``: its predictor's proposal, from its detached input, times the
        detached mask of the tokens alive before it); layers without a predictor: detached."""
        if self.option("skim_loss_on") == "cumulative":
            return list(out.keep)
        own = self.pruner.own_proposals if self.pruner.training and not out.hard else {}
        masks = []
        for layer, keep in enumerate(out.keep):
            if layer not in own or own[layer].shape != keep.shape:  # no predictor, or no training forward
                masks.append(keep.detach())
                continue
            alive = out.keep[layer - 1] if layer > 0 else out.padding
            masks.append(torch.cat([keep[:, :1].detach(), own[layer][:, 1:] * alive[:, 1:].detach()], dim=1))
        return masks

    def kept_fraction(self, out: EncoderOutput) -> Tensor:
        """``sum_l w_l * mean_b(sum_j m_lj / norm_b)``: ``norm_b`` the real length n_b ([CLS]
        included; ``skim_norm=real``, ours) or the padded length N (``padded``, the reference's);
        ``w_l`` the normalised ``skim_layer_weights`` (uniform 1/L: the reference)."""
        masks = self.layer_masks(out)
        kept = torch.stack([mask.sum(1) for mask in masks])  # L x B, carries straight-through grads
        if self.option("skim_norm") == "padded":
            norm = torch.full_like(out.lengths, out.padding.shape[1])
        else:
            norm = out.lengths.clamp(min=1)
        weights = torch.tensor(self.layer_weights, dtype=kept.dtype, device=kept.device)
        return (weights[:, None] * kept / norm).sum(0).mean()

    def pruning_losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """protocol=paper: the skim term on ``kept_fraction`` (k); protocol=shared: none (the
        FLOPs target, on the decisions' expected kept tokens, takes its place):

        - ``skim_target`` null: ``ramp * skim_lambda * k`` (the reference's linear skim loss);
        - ``lagrangian``: ``lambda1 * (k - t) + lambda2 * (k - t)^2``, the multipliers ascending;
        - ``quadratic``: ``skim_lambda * (k - t)^2``;

        with ``t = 1 - ramp * (1 - skim_target)`` and ``ramp`` the ``skim_warmup``'s.
        """
        if self.shared:
            return {}
        kept = self.kept_fraction(out)
        values = {"skim_kept_fraction": kept}  # not "kept_fraction": the callback logs kept_fraction/layer_<l>
        if self.option("skim_target") is None:
            skim = self.ramp() * float(self.cfg.method.skim_lambda) * kept
        else:
            t = self.target()
            values["skim_target"] = t
            if hasattr(self, "multipliers"):
                skim = constraints.lagrangian(kept - t, self.multipliers)
                values.update(lambda1=self.multipliers[0], lambda2=self.multipliers[1])
            else:
                skim = float(self.cfg.method.skim_lambda) * (kept - t) ** 2
        constraints.log_train(self, values, len(logits))
        self.pruner.own_proposals = {}  # used; the next forward records anew (no graph kept on the module)
        return {"skim_loss": skim}
