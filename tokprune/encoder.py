"""The one prunable BERT encoder that every method shares.

It reuses a pretrained ``BertModel``'s embeddings and layers (their own submodules: the
Q/K/V projections, output blocks and feed-forward), and runs its own loop over the
layers with a pruning hook before each one::

    keep = padding mask
    for l, layer in enumerate(layers):
        keep = pruner(PruneContext(l, hidden, keep, attn_probs_prev, padding))  # cumulative, [CLS] pinned
        hidden, attn_probs_prev = run_layer(l, hidden, keep)

What every method shares is enforced here, not in the pruners: masks are cumulative,
``[CLS]`` is never dropped, padding is never kept, and a dropped token carries its last
hidden state forward to the output.

Two modes:
- soft (training): shapes stay N and the mask acts through a *soft rule* (``SOFT_RULES``).
  The default, ``renormalised``, weights the attention probabilities by the key mask and
  renormalises over keys (``p' = p*m / sum_keys(p*m)``) and blends the residual stream
  (``h = m * layer(h) + (1 - m) * h``): for binary masks this is exactly hard removal, and
  its gradient reaches a mask entry even where the mask is 0;
- hard (inference): dropped tokens are physically removed before a layer (gather the kept
  positions, run the layer on the shorter sequence, scatter back), so the saved compute is
  real. Examples of a batch that keep different numbers of tokens are packed to the largest
  kept count. Hard mode needs binary masks; values > 0.5 count as kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertModel


#: How soft (training) mode applies a mask value m in [0, 1] to attention keys.
SOFT_RULES = {
    "renormalised": "probabilities x mask, renormalised over keys: equals hard removal for binary masks",
    "post_softmax": "probabilities x mask, not renormalised (Transkimmer's reference): NOT equal to hard removal",
}


@dataclass
class PruneContext:
    """What a pruner sees before layer ``layer``; everything is recomputed per forward,
    so no pruner needs state from an earlier layer's call."""

    layer: int
    hidden: Tensor  # B x N x d entering the layer
    keep: Tensor  # B x N cumulative mask so far (padding mask before layer 0)
    attn_probs: Tensor | None  # B x H x N x N of the previous layer (query x key); None before layer 0
    padding: Tensor  # B x N, 1 = real token

    @property
    def lengths(self) -> Tensor:
        """B: real (unpadded) length of each example."""
        return self.padding.sum(1)

    @property
    def live(self) -> Tensor:
        """B x N bool: tokens still computed (kept so far)."""
        return self.keep > 0

    def received_attention(self) -> Tensor:
        """B x N importance: attention received in the previous layer (see ``received_attention``)."""
        if self.attn_probs is None:
            raise ValueError(f"no attention before layer {self.layer}: importance needs a previous layer")
        return received_attention(self.attn_probs, self.keep)


class Pruner(nn.Module):
    """Decides, before each layer, which tokens the layer computes.

    ``forward(ctx)`` gets a ``PruneContext`` and returns the proposed keep mask (B x N);
    the encoder multiplies it into the running mask, pins ``[CLS]`` and drops padding.
    Values may be soft (and carry gradients) in training.
    """

    #: False lets hard mode skip scattering attention probabilities back to full size.
    needs_attention: bool = True
    #: True: the encoder multiplies a proposal by the running mask *binarised* (> 0), so a soft
    #: value acts only in the layer that proposed it (ToP); False: by the running mask as it is,
    #: so soft values compound over layers. The same for binary masks (hard mode).
    binary_history: bool = False

    def wants_attention(self, layer: int) -> bool:
        """Whether the call before ``layer`` reads ``attn_probs`` (lets hard mode skip work)."""
        return self.needs_attention

    def cost_module(self, layer: int) -> nn.Module | None:
        """The per-token module the pruner runs before ``layer`` (hidden 1 x n x d in), so
        the FLOPs counter can charge its cost; ``None`` if it computes nothing fvcore counts."""
        return None

    def forward(self, ctx: PruneContext) -> Tensor:
        raise NotImplementedError


class KeepAll(Pruner):
    """Prunes nothing: the unpruned baseline."""

    needs_attention = False

    def forward(self, ctx: PruneContext) -> Tensor:
        return ctx.keep


@dataclass
class EncoderOutput:
    """What the encoder returns; methods and the FLOPs callback read only this."""

    hidden: Tensor  # B x N x d final states; a dropped token carries its last state
    keep: list[Tensor]  # per layer: B x N mask the layer used (float; binary in hard mode)
    attentions: list[Tensor | None]  # per layer: B x H x N x N probabilities, full coordinates
    padding: Tensor  # B x N, 1 = real token
    hard: bool = False

    @property
    def lengths(self) -> Tensor:
        """Real (unpadded) length of each example."""
        return self.padding.sum(1)

    def kept_counts(self) -> Tensor:
        """L x B: tokens each layer computes for each example (mask > 0.5, as hard mode)."""
        return torch.stack([(k.detach() > 0.5).sum(1) for k in self.keep])

    def kept_fraction(self) -> Tensor:
        """L: mean over the batch of the fraction of real tokens each layer computes."""
        return (self.kept_counts() / self.lengths.clamp(min=1)).mean(1)


def received_attention(attn_probs: Tensor, keep: Tensor) -> Tensor:
    """Importance of each token: attention it receives, averaged over heads and kept queries.

    ``attn_probs`` B x H x N x N (query x key), ``keep`` B x N. Returns B x N.
    """
    queries = (keep > 0).to(attn_probs.dtype)
    per_query = attn_probs.mean(1)  # B x N(query) x N(key)
    total = torch.einsum("bq,bqk->bk", queries, per_query)
    return total / queries.sum(1, keepdim=True).clamp(min=1)


class PrunableEncoder(nn.Module):
    """Embeddings + BERT layers of a pretrained model, run with a pruning hook per layer.

    ``soft_rule`` (a key of ``SOFT_RULES``) chooses how soft mode applies mask values to
    attention keys; hard mode always removes dropped tokens.
    """

    def __init__(self, bert: BertModel):
        super().__init__()
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer
        self.config = bert.config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        pruner: Pruner | None = None,
        hard: bool | None = None,
        soft_rule: str = "renormalised",
        output_attentions: bool = False,
    ) -> EncoderOutput:
        pruner = pruner if pruner is not None else KeepAll()
        hard = (not self.training) if hard is None else hard
        if soft_rule not in SOFT_RULES:
            raise ValueError(f"soft_rule must be one of {', '.join(SOFT_RULES)}, not {soft_rule!r}")
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        padding = attention_mask.to(hidden.dtype)
        keep, probs = padding, None
        keeps, attentions = [], []
        for index, layer in enumerate(self.layers):
            proposed = pruner(PruneContext(index, hidden, keep, probs, padding))
            history = (keep > 0).to(keep.dtype) if pruner.binary_history else keep
            keep = torch.cat([padding[:, :1], (proposed * history)[:, 1:]], dim=1)  # cumulative, CLS pinned
            if hard:
                keep = (keep > 0.5).to(hidden.dtype)
                want_probs = output_attentions or pruner.wants_attention(index + 1)
                hidden, probs = self._hard_layer(layer, hidden, keep.bool(), want_probs)
            else:
                hidden, probs = self._soft_layer(layer, hidden, keep, padding, soft_rule)
            keeps.append(keep)
            attentions.append(probs)
        return EncoderOutput(hidden, keeps, attentions, padding, hard=hard)

    # -- running one layer ------------------------------------------------------------

    @staticmethod
    def key_bias(visible: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive score mask, B x 1 x 1 x N: 0 for visible keys, the dtype's minimum else."""
        return ((~visible).to(dtype) * torch.finfo(dtype).min)[:, None, None, :]

    @staticmethod
    def _weighted_softmax(scores: Tensor, weight: Tensor) -> Tensor:
        """``softmax(scores) * w / sum_keys(softmax(scores) * w)``, computed stably.

        Shifting by the max over keys with ``w > 0`` changes nothing mathematically but keeps
        the kept keys' exponentials from underflowing when dropped keys dominated the scores.
        """
        w = weight[:, None, None, :]
        shift = scores.masked_fill(w <= 0, torch.finfo(scores.dtype).min).amax(-1, keepdim=True).detach()
        weighted = torch.exp(scores - shift) * w
        return weighted / weighted.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)

    @classmethod
    def run_layer(cls, layer: nn.Module, hidden: Tensor, key_bias: Tensor, key_weight: Tensor | None = None,
               renormalise: bool = True):
        """One BERT layer from its own modules, returning the attention probabilities too.

        ``key_weight`` (B x N, optional) scales each key's attention probability, then
        renormalises over keys (``renormalise``) or not (Transkimmer's reference rule).
        """
        attn = layer.attention.self
        batch, length, _ = hidden.shape
        shape = (batch, length, attn.num_attention_heads, attn.attention_head_size)
        query = attn.query(hidden).view(shape).transpose(1, 2)
        key = attn.key(hidden).view(shape).transpose(1, 2)
        value = attn.value(hidden).view(shape).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling + key_bias
        if key_weight is None:
            probs = scores.softmax(-1)
        elif renormalise:
            probs = cls._weighted_softmax(scores, key_weight)
        else:
            probs = scores.softmax(-1) * key_weight[:, None, None, :]
        context = torch.matmul(attn.dropout(probs), value).transpose(1, 2).reshape(batch, length, -1)
        attention_output = layer.attention.output(context, hidden)
        return layer.feed_forward_chunk(attention_output), probs

    def _soft_layer(self, layer, hidden, keep, padding, soft_rule):
        bias = self.key_bias(padding > 0, hidden.dtype)
        out, probs = self.run_layer(layer, hidden, bias, keep, renormalise=soft_rule == "renormalised")
        k = keep.unsqueeze(-1)
        return k * out + (1 - k) * hidden, probs

    def _hard_layer(self, layer, hidden, keep: Tensor, want_probs: bool):
        batch, length, width = hidden.shape
        counts = keep.sum(1)
        packed_len = int(counts.max())
        # Kept positions first, in their original order; the tail of a shorter example's
        # row points at (distinct) dropped positions and is written back unchanged.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :packed_len]
        valid = torch.arange(packed_len, device=hidden.device)[None, :] < counts[:, None]
        index = order.unsqueeze(-1).expand(batch, packed_len, width)
        packed = hidden.gather(1, index)
        out, probs = self.run_layer(layer, packed, self.key_bias(valid, hidden.dtype))
        out = torch.where(valid.unsqueeze(-1), out, packed)
        hidden = hidden.scatter(1, index, out)
        if not want_probs:
            return hidden, None
        return hidden, self._unpack_probs(probs * valid[:, None, :, None], order, length)

    @staticmethod
    def _unpack_probs(probs: Tensor, order: Tensor, length: int) -> Tensor:
        """Scatter packed B x H x K x K probabilities back to B x H x N x N (zeros elsewhere)."""
        batch, heads, packed_len, _ = probs.shape
        cols = order[:, None, None, :].expand(batch, heads, packed_len, packed_len)
        wide = probs.new_zeros(batch, heads, packed_len, length).scatter(3, cols, probs)
        rows = order[:, None, :, None].expand(batch, heads, packed_len, length)
        return probs.new_zeros(batch, heads, length, length).scatter(2, rows, wide)
