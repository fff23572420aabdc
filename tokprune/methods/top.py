"""``method=top``: ToP, constraint-aware and ranking-distilled token pruning (Li et al., KDD 2023,
arXiv 2306.14393), on the shared encoder.

Before each prunable layer the live tokens are ranked by the attention they received in the
previous layer; a token's rank, as a share of the live length, falls into one of ``bins`` bins,
and each (layer, bin) has a hard-concrete mask; each prunable layer also has a hard-concrete
*layer gate* that decides whether the layer prunes at all. The expected FLOPs sparsity of those
masks is held at a target by a Lagrangian whose multipliers are learned by gradient ascent. The
student learns from the fine-tuned unpruned model (the teacher): its logits replace the labels,
and its last layer's token ranking is distilled into the student's early layers, whose attention
makes the first pruning decisions.

Reference facts (microsoft/Moonlit, folder ``ToP``; lines of the files as fetched):

- hard-concrete masks (``models/l0_module.py``): ``a=-0.1, b=1.1`` (l.16), ``T=2/3`` (l.57);
  ``u ~ U[1e-6, 1-1e-6]`` (l.348-352); ``z = hardtanh(sigmoid((log u - log(1-u) + log_alpha)/T)
  * (b-a) + a, 0, 1)`` (l.267-269, 355-359); ``P(z>0) = 1 - sigmoid(T*log(-a/b) - log_alpha)``
  clamped to [1e-6, 1-1e-6] (l.261-265). One sample of every mask per step, shared by the batch
  (``trainer/trainer.py`` l.314);
- token masks ``[prune layer, bin]`` init N(+10, 0.01) (l.223-230), layer gates ``[prune layer]``
  ("pruner") init N(-10, 0.01) (l.232-239): every token bin on, every layer gate off, so training
  starts unpruned. After every optimiser step all log_alphas are clamped to ``[ln 0.01, ln 100]``
  (l.255-259; ``trainer.py`` l.344-345), so the inits act as +-4.6 from step 1;
- ranking (``models/modeling_bert.py`` l.331-360): importance (attention received, mean over heads
  and query rows, [CLS] column dropped: l.503, 524) times the previous *binarised* keep, so dead
  tokens rank last; live length = binarised keep summed without [CLS]; ``bin = floor(clamp(rank /
  len, 0, 1) * bins)``, a bin index of ``bins`` (dead tokens) maps to 0. Only the layer gate is
  straight-through: ``keep = (1 - (1 - z_token[bin]) * ST(z_layer)) * (prev_keep > 0)``, the token
  value stays continuous. Prune locations: ``2..11`` for BERT-base (``args.py`` l.52, README);
- evaluation (``l0_module.py`` l.362-382, ``modeling_bert.py`` l.362-387): deterministic masks
  zero the ``round(size - sum P(z>0))`` entries with the smallest ``sigmoid(log_alpha / T * 0.8)``
  and set the rest to 1. For a layer gate (size 1) that rule reads: on iff ``round(1 - P) == 0``,
  i.e. **on iff P(z>0) >= 0.5** (Python rounds 0.5 to 0);
- expected sparsity (``l0_module.py`` l.596-661): from P(z>0), never samples; a prune layer keeps
  ``1 - (1 - mean_bins P_token) * P_layer`` of the tokens entering it, cumulated (product) over
  layers, layer 0 at 1; per example at its real length ``n`` (attention mask summed, [CLS] and
  [SEP] included) the layer runs ``(n - 1) * ratio + 1`` tokens; MACs per layer
  ``H*(3*n*d*d_h + 2*n^2*d_h + n^2) + n*d^2 + 2*n'*d*d_ff`` (l.461-510) with the FFN at the *next*
  layer's length ``n'`` (l.504, 567), hard-coded for BERT-base (l.577-580: 768, 3072, 12x64);
  ``s_hat = 1 - mean_b(MACs / MACs_full)``. Lagrangian ``lambda1*(s_hat - t) + lambda2*(s_hat -
  t)^2`` (l.665-691), lambdas 0 at start (l.127-128); ``t = target * min(1, step / warmup_steps)``
  (l.341-343) with the warm-up given in epochs (``trainer.py`` l.201);
- optimisers (``trainer.py`` l.134-184): masks AdamW lr ``reg_lr``, lambdas AdamW lr ``-reg_lr``
  (ascent), both weight decay 0 and no schedule; the model AdamW with linear decay, parameters
  named "embeddings" left out (frozen; ``--freeze_embeddings`` in ``scripts/run_TokenPrune.sh``);
  gradient clipping 1.0 on the model's parameters only (l.332-333);
- logit distillation (l.650-667): ``kl_div(log_softmax(z_s/T), softmax(z_t/T), batchmean) * T^2``,
  no label term, ``T = 2`` (``distill_temp=2`` in the script). STS-B is in
  ``GLUE_TASK_FOR_NO_DISTILLATION`` (l.63, 779): it trains on the labels' MSE, not the teacher's;
- ranking distillation (l.676-756, 829-844): target = the teacher's last-layer importance
  (``last_pred_score``); student layers ``range(1, L // 3)`` (l.691: 1, 2, 3 on BERT-base); the
  teacher's top ``K = min(topk, length)`` tokens get relevance K..1 and only they form the list
  (other tokens are not in the loss); LambdaLoss ARP-2 of pytorchltr, sigma 1:
  ``sum_{y_i > y_j} (y_i - y_j) * log2(1 + exp(-(s_i - s_j)))`` on the student's raw importance,
  divided by ``K^2`` (l.728), mean over the batch, summed over the layers; weight ``alpha *
  max(0.01, 1 - warmup_progress)`` where the progress is the *target warm-up's* (l.838-841;
  ``l0_module.py`` l.345-346), so after the warm-up the weight is ``alpha / 100``;
- selection (l.539-541, 597-600): the best dev score is only kept once the expected sparsity is
  within ``sparsity_epsilon`` of the target (README: 0.01; ``args.py`` l.41 default 0, which the
  script ends up using).

Ours, and why:

- the expected sparsity is ``1 - expected FLOPs ratio`` from the one FLOPs model every method's
  target uses (``flops.FlopsCounter.expected_ratio``: the backbone's own fvcore per-layer costs,
  exact polynomials in the length, summed over the batch as the FLOPs callback measures), not a
  second hand-written MAC formula: with BERT-base's hard-coded sizes the reference's is wrong for
  MiniLM, and its FFN at the *next* layer's length assumes a deployment that skips the FFN of
  tokens about to be dropped, which neither it nor we implement. Each layer's FFN is counted at
  its own length, what our encoder runs and the selection constraint reads;
- ``protocol=shared`` (``methods.protocol``) replaces the paper's own target by the shared
  ``protocol.target_flops`` (its warm-up and multipliers' lr too) and takes the teacher from
  ``protocol.baseline_checkpoint``; under ``protocol=paper`` ``target_sparsity``, ``target_warmup``
  and ``reg_lr`` hold as in the paper. The teacher's outputs per training row are computed once
  and reused (``protocol.teacher_cache``), in both protocols;
- importance averages over real, kept query rows, before attention dropout (the encoder's
  ``received_attention``); the reference averages over all rows, padding included, after dropout;
- bins by exact integer floor; the reference divides by ``len + 1e-6``, which moves a rank that
  falls exactly on a bin boundary into the bin before;
- ranking loss: pairs among the teacher's top ``K_b = min(topk, n_b - 1)`` real tokens of each
  example ([CLS] and padding never in a pair), divided by ``K_b^2``. The reference takes K from
  the batch's longest example, pads short examples' lists with zero-scored padding entries, and
  divides by that batch K, so an example's loss depended on its batch;
- evaluation masks, ``eval_masks: expected`` (default): each prunable layer keeps the
  ``round(bins * (1 - (1 - mean_bins P_token) * P_layer))`` bins with the largest
  ``sigmoid(log_alpha / T * 0.8)`` (ties: the more important rank), its gate on iff a bin is
  dropped. That is the expected share of tokens the layer keeps in training, which is what the
  constraint holds at the target. The reference's rule (``eval_masks: reference``) rounds the bins
  and the gate separately; a gate that training leaves at P = 0.6 prunes fully at evaluation (or
  not at all at 0.4), so the measured sparsity missed its target (cpu budget, MiniLM, target 0.5:
  FLOPs ratio 0.41-0.43 where the expected sparsity said 0.49-0.51; layer gates ended at
  P 0.29-0.87, far from 0 or 1, after 345-500 steps);
- the selection constraint is the *measured* hard-mode FLOPs ratio at real length
  (``val/flops_ratio_real <= 1 - target_sparsity + selection_epsilon``), per validation; the
  reference starts keeping the best once the *expected* sparsity first reaches the target and
  never stops;
- the multipliers' ascent flips their gradient inside the graph (``2*lambda.detach() - lambda``:
  same value, gradient negated) and uses AdamW with lr ``+reg_lr``; AdamW rejects the reference's
  negative lr, and with weight decay 0 the two updates are identical (``tokprune.methods.constraints``,
  held by the shared module for every method's FLOPs target; the logit distillation is
  ``tokprune.methods.distill``);
- default ``distill_layers`` ``range(1, max(2, L // 3))``: the reference's rule with at least one
  layer. Layer 1's attention makes the first pruning decision (before layer 2), which is why the
  paper distils the early layers; on a 6-layer MiniLM that is layer 1 alone;
- default ``prunable_layers`` ``2..L-1`` (``max(1, min(2, L - 1))..L-1`` for models with fewer than
  3 layers; layer 0 has no previous attention to rank by);
- soft rule: the encoder's renormalised key weighting + blend (hard-equivalent). The reference's
  training rule (zeroing the hidden states of dropped tokens, ``modeling_bert.py`` l.453, while
  they stay attention keys) is not provided: it is not what hard removal computes, and the
  reference itself never evaluates with removal (its inference masks keys, l.382-386).

Loss (``P`` = P(z>0); ``t`` the warmed-up target; ``w = min(1, progress / target_warmup)``)::

    KL(teacher || student) at temperature T, times T^2   (regression: MSE to the labels, or the teacher)
    + distill_alpha * max(0.01, 1 - w) * sum_{distilled layers} rank_loss
    + lambda1 * (s_hat(P) - t) + lambda2 * (s_hat(P) - t)^2      (lambdas ascend; methods.base)

with ``s_hat = 1 - expected FLOPs ratio`` and ``t = 1 - the target ratio`` (``protocol.target_flops``
under protocol=shared, ``1 - target_sparsity`` under protocol=paper).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tokprune.core.encoder import EncoderOutput, PruneContext, Pruner, received_attention, untraced
from tokprune.errors import UsageError
from tokprune.methods import constraints
from tokprune.methods.base import PruningModule
from tokprune.methods.distill import logit_distillation
from tokprune.methods.protocol import FlopsTarget

LIMIT_A, LIMIT_B = -0.1, 1.1  # the stretched interval of the hard-concrete distribution
TEMPERATURE = 2.0 / 3.0  # hard-concrete temperature
EPSILON = 1e-6  # u ~ U[eps, 1 - eps]; P(z>0) clamped to [eps, 1 - eps]
MAGICAL_NUMBER = 0.8  # deterministic masks rank entries by sigmoid(log_alpha / T * 0.8) (Wang et al. 2020)
TOKEN_INIT, LAYER_INIT, INIT_STD = 10.0, -10.0, 0.01  # every bin on, every layer gate off
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # clamp after every optimiser step
WHAT = "method.teacher_checkpoint"


# -- hard-concrete masks ---------------------------------------------------------------


def prob_nonzero(log_alpha: Tensor) -> Tensor:
    """P(z > 0) of each hard-concrete mask: ``1 - sigmoid(T*log(-a/b) - log_alpha)``, clamped."""
    return (1 - torch.sigmoid(TEMPERATURE * math.log(-LIMIT_A / LIMIT_B) - log_alpha)).clamp(EPSILON, 1 - EPSILON)


def sample_hard_concrete(log_alpha: Tensor) -> Tensor:
    """One sample of every mask in ``log_alpha`` (values in [0, 1], exactly 0 or 1 often)."""
    u = torch.empty_like(log_alpha).uniform_(EPSILON, 1 - EPSILON)
    stretched = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / TEMPERATURE) * (LIMIT_B - LIMIT_A) + LIMIT_A
    return F.hardtanh(stretched, 0.0, 1.0)


def deterministic_mask(log_alpha: Tensor) -> Tensor:
    """Evaluation masks of a 1-D ``log_alpha``: the ``round(size - sum P(z>0))`` entries with the
    smallest ``sigmoid(log_alpha / T * 0.8)`` are 0, the rest 1."""
    zeros = round(log_alpha.numel() - float(prob_nonzero(log_alpha).sum()))
    mask = torch.ones_like(log_alpha)
    if zeros > 0:
        soft = torch.sigmoid(log_alpha / TEMPERATURE * MAGICAL_NUMBER)
        mask[soft.argsort(stable=True)[:zeros]] = 0.0
    return mask


def expected_share_masks(token_log_alpha: Tensor, layer_log_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluation masks that keep each layer's expected share of tokens: (prunable layers) x bins
    token masks with the ``round(bins * (1 - (1 - mean_bins P_token) * P_layer))`` highest-scored
    bins on (ties: the lower bin, a more important rank), and gates on iff some bin is off."""
    bins = token_log_alpha.shape[1]
    share = 1 - (1 - prob_nonzero(token_log_alpha).mean(1)) * prob_nonzero(layer_log_alpha)
    kept = (share * bins).round()
    order = torch.sigmoid(token_log_alpha / TEMPERATURE * MAGICAL_NUMBER).argsort(dim=1, descending=True, stable=True)
    on = (torch.arange(bins, device=kept.device)[None, :] < kept[:, None]).to(token_log_alpha.dtype)
    tokens = torch.zeros_like(token_log_alpha).scatter_(1, order, on)
    return tokens, (kept < bins).to(tokens.dtype)


def log_alpha_for(probability: float) -> float:
    """The log_alpha whose P(z > 0) is ``probability`` (the inverse of ``prob_nonzero``)."""
    return math.log(probability / (1 - probability)) + TEMPERATURE * math.log(-LIMIT_A / LIMIT_B)


# -- the pruner --------------------------------------------------------------------------


class TopPruner(Pruner):
    """Hard-concrete token masks per (prunable layer, rank bin) and a gate per prunable layer."""

    binary_history = True  # keep = proposal x (previous keep > 0): soft values never compound

    def __init__(self, num_layers: int, layers: list[int], bins: int, eval_masks: str = "expected"):
        super().__init__()
        if eval_masks not in ("expected", "reference"):
            raise UsageError(f"method.eval_masks must be expected or reference, not {eval_masks!r}")
        if not layers:
            raise UsageError("method.prunable_layers is empty: ToP needs at least one prunable layer")
        bad = [layer for layer in layers if not 1 <= layer < num_layers]
        if bad or len(set(layers)) != len(layers):
            raise UsageError(
                f"method.prunable_layers must be distinct layers in 1..{num_layers - 1} (layer 0 "
                f"has no previous attention to rank by), not {list(layers)}"
            )
        if bins < 1:
            raise UsageError(f"method.bins must be >= 1, not {bins}")
        self.layers, self.bins, self.num_layers, self.eval_rule = sorted(layers), bins, num_layers, eval_masks
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.token_log_alpha = nn.Parameter(torch.empty(len(layers), bins).normal_(TOKEN_INIT, INIT_STD))
        self.layer_log_alpha = nn.Parameter(torch.empty(len(layers)).normal_(LAYER_INIT, INIT_STD))

    def wants_attention(self, layer: int) -> bool:
        return layer in self.index

    def token_prob(self) -> Tensor:
        """(prunable layers) x bins: P(z > 0) of each token mask."""
        return prob_nonzero(self.token_log_alpha)

    def layer_prob(self) -> Tensor:
        """(prunable layers): P(z > 0) of each layer gate (1 = the layer prunes)."""
        return prob_nonzero(self.layer_log_alpha)

    def deterministic(self) -> tuple[Tensor, Tensor]:
        """Evaluation masks: token bins (prunable layers x bins) and layer gates. ``expected``: each
        layer keeps its expected share of bins; ``reference``: ``deterministic_mask`` per layer's bins
        and a gate on iff P >= 0.5."""
        if self.eval_rule == "expected":
            return expected_share_masks(self.token_log_alpha.detach(), self.layer_log_alpha.detach())
        tokens = torch.stack([deterministic_mask(row) for row in self.token_log_alpha.detach()])
        return tokens, (self.layer_prob().detach() >= 0.5).to(tokens.dtype)

    def eval_masks(self) -> tuple[Tensor, Tensor]:
        """``deterministic()``, cached while the log_alphas are unchanged (in place updates and
        loads bump their versions) and computed outside any trace, so inference computes it once,
        not per layer and call, and an ONNX export folds it into constants."""
        key = (
            self.token_log_alpha._version,
            self.layer_log_alpha._version,
            self.token_log_alpha.data_ptr(),
            self.layer_log_alpha.data_ptr(),
        )
        if getattr(self, "_eval_key", None) != key:
            with untraced():
                self._eval_masks = self.deterministic()
            self._eval_key = key
        return self._eval_masks

    def decides(self, layer: int) -> bool:
        return layer in self.index

    def clamp_(self) -> None:
        with torch.no_grad():
            self.token_log_alpha.clamp_(*LOG_ALPHA_RANGE)
            self.layer_log_alpha.clamp_(*LOG_ALPHA_RANGE)

    def bins_of(self, ctx: PruneContext) -> Tensor:
        """B x (N-1) bin of every token but [CLS]: live tokens by importance (attention received in
        the previous layer, most first) as a share of the live length; dead tokens and padding
        get ``bins``, an index whose mask is always 0."""
        live = ctx.live[:, 1:]
        scores = ctx.received_attention()[:, 1:].masked_fill(~live, -1.0)  # received attention >= 0
        ranks = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        count = live.sum(1, keepdim=True).clamp(min=1)
        bins = torch.div(ranks * self.bins, count, rounding_mode="floor").clamp(max=self.bins)
        return bins.masked_fill(~live, self.bins)

    def forward(self, ctx: PruneContext) -> Tensor:
        if ctx.layer not in self.index:
            return ctx.keep
        i = self.index[ctx.layer]
        if self.training:  # one sample per step, shared by the batch
            tokens = sample_hard_concrete(self.token_log_alpha[i])
            z = sample_hard_concrete(self.layer_log_alpha[i])
            gate = (z > 0).to(z.dtype) - z.detach() + z  # straight-through: forward 1{z>0}, gradient of z
        else:
            tokens, gates = self.eval_masks()
            tokens, gate = tokens[i], gates[i]
        tokens = torch.cat([tokens, tokens.new_zeros(1)]).to(ctx.keep.dtype)  # index `bins`: dead, always 0
        keep = 1 - (1 - tokens[self.bins_of(ctx)]) * gate
        keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)  # [CLS]: the encoder pins it anyway
        return keep * ctx.live.to(keep.dtype)


# -- the constraint and the distillation losses -------------------------------------------


def layer_keep_ratios(token_p: Tensor, layer_p: Tensor, layers: list[int], num_layers: int) -> Tensor:
    """L: expected share of the (non-[CLS]) tokens each layer computes, cumulative over layers.

    A prunable layer keeps ``1 - (1 - mean_bins P_token) * P_layer`` of the tokens entering it;
    other layers keep all; layer 0 computes every token.
    """
    kept = 1 - (1 - token_p.mean(1)) * layer_p
    index = {layer: i for i, layer in enumerate(layers)}
    ratio, ratios = token_p.new_ones(()), []
    for layer in range(num_layers):
        if layer in index:
            ratio = ratio * kept[index[layer]]
        ratios.append(ratio)
    return torch.stack(ratios)


def rank_distillation_loss(student: Tensor, teacher: Tensor, padding: Tensor, topk: int) -> Tensor:
    """LambdaLoss ARP-2 (sigma 1) of the student's token scores against the teacher's ranking.

    ``student``, ``teacher``: B x N importance ([CLS] at 0 is never ranked); ``padding`` B x N.
    Example b's list is the teacher's top ``K_b = min(topk, real tokens but [CLS])``, with relevance
    K_b..1; the loss ``sum_{y_i > y_j} (y_i - y_j) * log2(1 + exp(-(s_i - s_j)))`` over its pairs,
    divided by ``K_b^2``, is averaged over the batch.
    """
    real = padding[:, 1:] > 0
    size = min(topk, real.shape[1])
    if size == 0:
        return student.sum() * 0
    order = teacher[:, 1:].detach().masked_fill(~real, float("-inf")).topk(size, dim=1).indices  # most first
    scores = student[:, 1:].gather(1, order)
    k = real.sum(1).clamp(max=topk)  # B: list length
    position = torch.arange(size, device=student.device)
    listed = position[None, :] < k[:, None]
    relevance = ((k[:, None] - position[None, :]) * listed).to(student.dtype)
    gain = relevance[:, :, None] - relevance[:, None, :]
    pairs = listed[:, :, None] & listed[:, None, :] & (gain > 0)
    margin = scores[:, :, None] - scores[:, None, :]
    per_pair = torch.where(pairs, gain * F.softplus(-margin) / math.log(2), torch.zeros_like(margin))
    return (per_pair.sum((1, 2)) / k.clamp(min=1).to(student.dtype) ** 2).mean()


# -- the method ----------------------------------------------------------------------------


class Method(PruningModule):
    """Teacher-distilled student whose token masks meet a FLOPs target through a Lagrangian."""

    follows_protocol = learns_decisions = needs_teacher = True
    # protocol=paper: the teacher is the student's start too; empty: the baseline run, found or trained once
    paper_init_key = paper_teacher_key = paper_baseline_checkpoint_key = WHAT

    def __init__(self, cfg, bert, task):
        super().__init__(cfg, bert, task)
        m, num_layers = cfg.method, self.encoder.num_layers
        layers = m.distill_layers
        self.distill_layers = list(range(1, max(2, num_layers // 3))) if layers is None else list(layers)
        if not self.distill_layers or any(not 0 <= layer < num_layers for layer in self.distill_layers):
            raise UsageError(
                f"method.distill_layers must be at least one layer in 0..{num_layers - 1}, not {self.distill_layers}"
            )
        if m.regression_target not in ("labels", "teacher"):
            raise UsageError(f"method.regression_target must be labels or teacher, not {m.regression_target!r}")

    @staticmethod
    def default_prunable_layers(num_layers: int) -> list[int]:
        """2..L-1 (the reference's 2..11 on BERT-base); from layer 1 on models of fewer than 3 layers."""
        return list(range(max(1, min(2, num_layers - 1)), num_layers))

    def build_pruner(self) -> Pruner:
        m, num_layers = self.cfg.method, self.encoder.num_layers
        layers = self.default_prunable_layers(num_layers) if m.prunable_layers is None else list(m.prunable_layers)
        # a checkpoint written before eval_masks existed was selected with the reference's masks
        return TopPruner(num_layers, layers, int(m.bins), m.get("eval_masks", "reference"))

    def own_flops_target(self) -> FlopsTarget:
        """protocol=paper: FLOPs ratio ``1 - target_sparsity``, ramped in over ``target_warmup``, held by
        the Lagrangian with multipliers at ``reg_lr``; selection within ``selection_epsilon``."""
        m = self.cfg.method
        return FlopsTarget(
            1 - float(m.target_sparsity),
            float(m.target_warmup),
            "lagrangian",
            0.0,
            float(m.reg_lr),
            float(m.get("selection_epsilon", 0.01)),
        )

    # -- fitting ---------------------------------------------------------------------------

    def prepare_fit(self, datamodule=None) -> None:
        """Load the teacher (frozen) and start the student from its weights; freeze the embeddings."""
        if not self.shared and not self.cfg.method.teacher_checkpoint:
            raise UsageError(
                "method=top distils from the fine-tuned unpruned model: set "
                "method.teacher_checkpoint=<best.ckpt of a method=none run> of the same task and "
                "model (train and sweep fill it with the baseline run's, found in the MLflow store or trained once)"
            )
        super().prepare_fit(datamodule)
        for name, param in self.named_parameters():
            if "embeddings" in name:
                param.requires_grad_(False)

    def own_parameter_groups(self) -> list[dict]:
        """Masks: AdamW at a constant ``reg_lr``, no weight decay (the multipliers: ``methods.base``)."""
        return [
            constraints.constant_group(
                [self.pruner.token_log_alpha, self.pruner.layer_log_alpha], self.cfg.method.reg_lr
            )
        ]

    def unclipped_parameters(self) -> list:
        """The masks and multipliers are not clipped with the model's gradients (as the reference)."""
        return [*super().unclipped_parameters(), self.pruner.token_log_alpha, self.pruner.layer_log_alpha]

    def after_optimizer_step(self) -> None:
        self.pruner.clamp_()

    # -- the constraint's input and the losses -----------------------------------------------

    def expected_kept(self, out: EncoderOutput) -> Tensor:
        """L x B: example b computes ``(n_b - 1) * ratio_l + 1`` tokens in layer l (``layer_keep_ratios``
        of P(z>0), never samples; [CLS] always), the reference's expected length."""
        ratios = layer_keep_ratios(
            self.pruner.token_prob(), self.pruner.layer_prob(), self.pruner.layers, self.encoder.num_layers
        )
        n = out.lengths.to(ratios.dtype)
        return (n[None, :] - 1) * ratios[:, None] + 1

    def loss_attention_layers(self) -> tuple[int, ...]:
        return tuple(self.distill_layers)

    def rank_weight(self) -> float:
        """``alpha * max(0.01, 1 - ramp)``: the ranking weight decays with the target's warm-up."""
        return float(self.cfg.method.distill_alpha) * max(0.01, 1.0 - self.flops_ramp())

    def prediction_losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """KD from the teacher instead of the labels, plus the ranking distillation."""
        m = self.cfg.method
        teacher = self.teacher_outputs(batch)
        if not self.task.is_regression:
            terms = {"distill_loss": logit_distillation(logits, teacher.logits, float(m.temperature))}
        elif m.regression_target == "teacher":
            terms = {"distill_loss": F.mse_loss(logits.squeeze(-1), teacher.logits.squeeze(-1))}
        else:  # the reference: STS-B trains on its labels
            terms = {"task_loss": self.task_loss(logits, batch["labels"])}
        rank = sum(
            rank_distillation_loss(
                received_attention(out.attentions[layer], out.keep[layer]),
                teacher.importance,
                out.padding,
                int(m.distill_topk),
            )
            for layer in self.distill_layers
        )
        constraints.log_train(self, {"rank_loss_unweighted": rank}, len(logits))
        return {**terms, "rank_loss": self.rank_weight() * rank}

    # -- reporting ---------------------------------------------------------------------------

    def state_tables(self) -> dict[str, str]:
        """Per prunable layer: the layer gate's P(z>0) and evaluation value, the bins kept at
        evaluation, and every bin's P(z>0)."""
        tokens, gates = self.pruner.deterministic()
        token_p, layer_p = self.pruner.token_prob().detach().cpu(), self.pruner.layer_prob().detach().cpu()
        header = "layer\tgate_prob\tgate_on\tbins_kept\t" + "\t".join(f"p_bin_{b}" for b in range(self.pruner.bins))
        rows = [
            f"{layer}\t{layer_p[i]:.3f}\t{int(gates[i])}\t{int(tokens[i].sum())}\t"
            + "\t".join(f"{p:.3f}" for p in token_p[i].tolist())
            for i, layer in enumerate(self.pruner.layers)
        ]
        return {"top_masks.tsv": "\n".join([header, *rows]) + "\n"}
