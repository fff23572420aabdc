"""The one prunable BERT encoder that every method shares.

It reuses a pretrained ``BertModel``'s embeddings and layers (their own submodules: the
Q/K/V projections, output blocks and feed-forward), and runs its own loop over the
layers with a pruning hook before each one::

    keep = padding mask
    for l, layer in enumerate(layers):
        keep = pruner(l, hidden, keep, attn_probs_prev)   # made cumulative, [CLS] pinned to 1
        hidden, attn_probs_prev = run_layer(l, hidden, keep)

What every method shares is enforced here, not in the pruners: masks are cumulative,
``[CLS]`` is never dropped, padding is never kept, and a dropped token carries its last
hidden state forward to the output.

Two modes:
- soft (training): shapes stay N, dropped tokens are hidden as attention keys and passed
  through unchanged (``h = keep * layer(h) + (1 - keep) * h``), so masks can carry gradients;
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


class Pruner(nn.Module):
    """Decides, before each layer, which tokens the layer computes.

    ``forward(layer, hidden, keep, attn_probs)`` gets the layer index, the hidden states
    entering it (B x N x d), the current keep mask (B x N, 1 = computed) and the previous
    layer's attention probabilities (B x H x N x N, ``None`` before layer 0) and returns the
    new keep mask. Values may be soft (and carry gradients) in training.
    """

    #: False lets hard mode skip scattering attention probabilities back to full size.
    needs_attention: bool = True

    def wants_attention(self, layer: int) -> bool:
        """Whether the call before ``layer`` reads ``attn_probs`` (lets hard mode skip work)."""
        return self.needs_attention

    def cost_module(self, layer: int) -> nn.Module | None:
        """The per-token module the pruner runs before ``layer`` (hidden 1 x n x d in), so
        the FLOPs counter can charge its cost; ``None`` if it computes nothing fvcore counts."""
        return None

    def forward(self, layer: int, hidden: Tensor, keep: Tensor, attn_probs: Tensor | None) -> Tensor:
        raise NotImplementedError


class KeepAll(Pruner):
    """Prunes nothing: the unpruned baseline."""

    needs_attention = False

    def forward(self, layer, hidden, keep, attn_probs):
        return keep


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

    ``key_mask`` chooses how soft mode hides dropped tokens from attention:
    ``"pre_softmax"`` masks their scores (exactly what hard removal computes);
    ``"post_softmax"`` multiplies the probabilities by the mask without renormalising
    (Transkimmer's training rule; it lets gradients reach the mask through attention).
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
        key_mask: str = "pre_softmax",
        output_attentions: bool = False,
    ) -> EncoderOutput:
        pruner = pruner if pruner is not None else KeepAll()
        hard = (not self.training) if hard is None else hard
        if key_mask not in ("pre_softmax", "post_softmax"):
            raise ValueError(f"key_mask must be 'pre_softmax' or 'post_softmax', not {key_mask!r}")
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        padding = attention_mask.to(hidden.dtype)
        keep, probs = padding, None
        keeps, attentions = [], []
        for index, layer in enumerate(self.layers):
            proposed = pruner(index, hidden, keep, probs)
            keep = torch.cat([padding[:, :1], (proposed * keep)[:, 1:]], dim=1)  # cumulative, CLS pinned
            if hard:
                keep = (keep > 0.5).to(hidden.dtype)
                want_probs = output_attentions or pruner.wants_attention(index + 1)
                hidden, probs = self._hard_layer(layer, hidden, keep.bool(), want_probs)
            else:
                hidden, probs = self._soft_layer(layer, hidden, keep, padding, key_mask)
            keeps.append(keep)
            attentions.append(probs)
        return EncoderOutput(hidden, keeps, attentions, padding, hard=hard)

    # -- running one layer ------------------------------------------------------------

    @staticmethod
    def _key_bias(visible: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive score mask, B x 1 x 1 x N: 0 for visible keys, the dtype's minimum else."""
        return ((~visible).to(dtype) * torch.finfo(dtype).min)[:, None, None, :]

    @staticmethod
    def _layer(layer: nn.Module, hidden: Tensor, key_bias: Tensor, key_scale: Tensor | None):
        """One BERT layer from its own modules, returning the attention probabilities too."""
        attn = layer.attention.self
        batch, length, _ = hidden.shape
        shape = (batch, length, attn.num_attention_heads, attn.attention_head_size)
        query = attn.query(hidden).view(shape).transpose(1, 2)
        key = attn.key(hidden).view(shape).transpose(1, 2)
        value = attn.value(hidden).view(shape).transpose(1, 2)
        scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling + key_bias
        probs = scores.softmax(-1)
        if key_scale is not None:
            probs = probs * key_scale[:, None, None, :]
        context = torch.matmul(attn.dropout(probs), value).transpose(1, 2).reshape(batch, length, -1)
        attention_output = layer.attention.output(context, hidden)
        return layer.feed_forward_chunk(attention_output), probs

    def _soft_layer(self, layer, hidden, keep, padding, key_mask):
        if key_mask == "pre_softmax":
            bias, scale = self._key_bias(keep > 0, hidden.dtype), None
        else:
            bias, scale = self._key_bias(padding > 0, hidden.dtype), keep
        out, probs = self._layer(layer, hidden, bias, scale)
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
        out, probs = self._layer(layer, packed, self._key_bias(valid, hidden.dtype), None)
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
