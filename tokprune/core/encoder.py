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
- hard (inference): dropped tokens are physically removed before a layer, so the saved
  compute is real. The kept tokens stay *packed* between layers (B x K x d, each row's kept
  tokens first in their original order, with their positions ``B x K``); a layer that drops
  more gathers from the packed sequence, and nothing is scattered back to full length unless
  someone asks: ``output="cls"`` returns [CLS]'s final state only (all a classifier reads),
  ``output="all"`` scatters every token's last state back at the end (one scatter per
  repacking), and a pruner that reads
  ``ctx.hidden`` or ``ctx.attn_probs`` gets them materialised on demand (``received_attention``
  and ``live_hidden`` work on the packed form directly). Examples of a batch that keep different
  numbers of tokens are packed to the largest kept count; before the first layer whose pruner
  decides, the batch keeps its input layout (padding slots are invalid keys, as in an unpruned
  model), so a model that prunes nothing adds no packing step. A layer whose attention
  probabilities nobody reads (``output_attentions`` off, ``Pruner.wants_attention`` False for
  the next call) runs fused attention (``scaled_dot_product_attention``) when run eagerly and
  exports as ONNX Runtime's fused ``Attention`` operator (``core.fused_attention``); under
  fvcore's trace and in ``run_layer``'s default it stays eager, because fvcore does not count
  SDPA. Hard mode needs binary masks; values > 0.5 count as kept.

In soft mode too, a layer whose probabilities nobody reads (``output_attentions`` names the
layers a caller wants) and whose mask carries no gradient (padding only, a fixed schedule, a
frozen teacher) runs fused attention with ``log m`` added to the scores, which is the renormalised
rule exactly; a mask with a gradient keeps the eager weighting (its gradient at m = 0 is finite).

Hard mode is written to be traced for ONNX export (``tokprune.serving.export``): no Python number is
taken from a data-dependent tensor (the packed length is a 0-d tensor fed to ``arange``; the
packing order is a sort on unique keys), so the traced graph keeps each input's own number of
tokens (TopK + Range + Gather/GatherElements in ONNX).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import BertModel

from tokprune.core.fused_attention import exported_attention, exporting_fused

#: How soft (training) mode applies a mask value m in [0, 1] to attention keys.
SOFT_RULES = {
    "renormalised": "probabilities x mask, renormalised over keys: equals hard removal for binary masks",
    "post_softmax": "probabilities x mask, not renormalised (Transkimmer's reference): NOT equal to hard removal",
}


@contextmanager
def untraced():
    """Run a weight-only computation outside any trace (``torch.jit`` tracing, hence ONNX
    export): its results enter the graph as constants, which they are once trained, and the
    trace never sees the Python numbers it takes from them. Eager code runs as usual."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


class PruneContext:
    """What a pruner sees before layer ``layer``; everything is recomputed per forward,
    so no pruner needs state from an earlier layer's call.

    ``hidden`` (B x N x d entering the layer; a dropped token carries its last state) and
    ``attn_probs`` (B x H x N x N of the previous layer, query x key, full coordinates; None
    before layer 0 or when the previous layer ran fused attention) are built on first access
    in hard mode, where the encoder keeps tokens packed: prefer ``received_attention()`` and
    ``live_hidden()``, which need no full-size tensor.
    """

    def __init__(
        self,
        layer: int,
        hidden: Tensor | None,
        keep: Tensor,
        attn_probs: Tensor | None,
        padding: Tensor,
        packed: PackedTokens | None = None,
    ):
        self.layer = layer
        self.keep = keep  # B x N cumulative mask so far (padding mask before layer 0)
        self.padding = padding  # B x N, 1 = real token
        self._hidden, self._attn_probs, self._packed = hidden, attn_probs, packed

    @property
    def hidden(self) -> Tensor:
        if self._hidden is None and self._packed is not None:
            self._hidden = self._packed.full_hidden()
        return self._hidden

    @property
    def attn_probs(self) -> Tensor | None:
        if self._attn_probs is None and self._packed is not None and self._packed.probs is not None:
            self._attn_probs = self._packed.full_probs()
        return self._attn_probs

    @property
    def lengths(self) -> Tensor:
        """B: real (unpadded) length of each example."""
        return self.padding.sum(1)

    @property
    def live(self) -> Tensor:
        """B x N bool: tokens still computed (kept so far)."""
        return self.keep > 0

    def live_hidden(self) -> Tensor:
        """(live tokens) x d: ``hidden[live]``, in the same order (example, then position)."""
        if self._hidden is None and self._packed is not None:
            return self._packed.hidden[self._packed.valid]
        return self.hidden[self.live]

    def received_attention(self) -> Tensor:
        """B x N importance: attention received in the previous layer (see ``received_attention``)."""
        if self._attn_probs is None and self._packed is not None and self._packed.probs is not None:
            return self._packed.received_attention()
        if self.attn_probs is None:
            raise ValueError(f"no attention before layer {self.layer}: importance needs a previous layer")
        return received_attention(self.attn_probs, self.keep)

    def importance_ranks(self) -> Tensor:
        """B x N rank of each token: [CLS] 0, then live tokens by attention received in the
        previous layer (most first, ties by position), dropped tokens and padding last."""
        scores = self.received_attention().masked_fill(~self.live, -1.0)
        scores[:, 0] = 2.0  # received attention is at most 1: [CLS] first
        return scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


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

    def decides(self, layer: int) -> bool:
        """Whether the call before ``layer`` may drop tokens. False promises it returns
        ``ctx.keep`` there, so hard mode skips the call and the repacking (default: True)."""
        return True

    def cost_module(self, layer: int) -> nn.Module | None:
        """The per-token module the pruner runs before ``layer`` (hidden 1 x n x d in), so
        the FLOPs counter can charge its cost; ``None`` if it computes nothing fvcore counts."""
        return None

    def forward(self, ctx: PruneContext) -> Tensor:
        raise NotImplementedError


class KeepAll(Pruner):
    """Prunes nothing: the unpruned baseline."""

    needs_attention = False

    def decides(self, layer: int) -> bool:
        return False

    def forward(self, ctx: PruneContext) -> Tensor:
        return ctx.keep


class Lazy(Sequence):
    """A list whose items may be zero-argument functions, called (once) on first access:
    hard mode's attention probabilities in full coordinates cost nothing unless read."""

    def __init__(self, items: list):
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        if callable(item):
            item = self._items[index] = item()
        return item


@dataclass
class EncoderOutput:
    """What the encoder returns; methods and the FLOPs callback read only this."""

    hidden: Tensor  # B x N x d final states (a dropped token carries its last state); B x 1 x d with output="cls"
    keep: list[Tensor]  # per layer: B x N mask the layer used (float; binary in hard mode)
    attentions: Sequence[Tensor | None]  # per layer: B x H x N x N probabilities, full coordinates
    padding: Tensor  # B x N, 1 = real token
    hard: bool = False
    counts: Tensor | None = None  # L x B kept counts, when an engine reports counts, not masks (ONNX)

    @property
    def lengths(self) -> Tensor:
        """Real (unpadded) length of each example."""
        return self.padding.sum(1)

    def kept_counts(self) -> Tensor:
        """L x B: tokens each layer computes for each example (mask > 0.5, as hard mode)."""
        if self.counts is not None:
            return self.counts
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


class PackedTokens:
    """Hard mode's running state: the tokens still computed, packed to the front of each row.

    ``hidden`` B x K x d holds each example's kept tokens first, in their original order, then
    filler slots (``valid`` False) up to the batch's largest kept count K; ``positions`` B x K are
    the kept tokens' indices in the full sequence, ``length`` for filler slots (a sacrificial
    column that scatters write into and crop away). ``probs`` (B x H x K x K) are the last
    layer's attention probabilities when it computed them. ``history`` keeps the states packed
    before each repacking, so the full B x N x d states (a dropped token carries its last state)
    can be scattered back on demand, and only then.
    """

    def __init__(
        self,
        hidden: Tensor,
        positions: Tensor,
        valid: Tensor,
        length: int,
        base: Tensor,
        history: list[tuple[Tensor, Tensor]],
        probs: Tensor | None = None,
    ):
        self.hidden, self.positions, self.valid, self.length = hidden, positions, valid, length
        self.base, self.history, self.probs = base, history, probs

    @classmethod
    def start(cls, hidden: Tensor, real: Tensor) -> PackedTokens:
        """Every token of ``hidden`` (B x N x d) in place; ``real`` (B x N bool) marks the valid ones."""
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device).expand_as(real).masked_fill(~real, length)
        return cls(hidden, positions, real, length, base=hidden, history=[])

    def select(self, keep: Tensor) -> PackedTokens:
        """Keep the tokens where ``keep`` (B x N, full coordinates, a subset of the live ones) is
        > 0, packed to the largest count. The count stays a tensor (traceable for ONNX)."""
        wide = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)
        chosen = (wide.gather(1, self.positions) > 0) & self.valid  # B x K, in slot order
        counts = chosen.sum(1)
        slots = chosen.shape[1]
        # unique keys: chosen slots first, each group in slot (= position) order, whatever the sort
        key = torch.arange(slots, device=keep.device)[None, :] + (~chosen).long() * slots
        packed = torch.arange(counts.max(), device=keep.device)  # K': a 0-d tensor, never a Python int
        order = torch.sort(key, dim=1).indices.index_select(1, packed)
        valid = packed[None, :] < counts[:, None]
        positions = self.positions.gather(1, order).masked_fill(~valid, self.length)
        hidden = self.hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1]))
        history = self.history if self.hidden is self.base else [*self.history, (self.positions, self.hidden)]
        return PackedTokens(hidden, positions, valid, self.length, self.base, history)

    def ran(self, hidden: Tensor, probs: Tensor | None) -> PackedTokens:
        """The same tokens after a layer."""
        return PackedTokens(hidden, self.positions, self.valid, self.length, self.base, self.history, probs)

    def full_hidden(self) -> Tensor:
        """B x N x d: every token's last state (one scatter per repacking)."""
        batch, _, width = self.base.shape
        full = torch.cat([self.base, self.base.new_zeros(batch, 1, width)], dim=1)
        steps = self.history + ([] if self.hidden is self.base else [(self.positions, self.hidden)])
        for positions, hidden in steps:
            full = full.scatter(1, positions.unsqueeze(-1).expand(-1, -1, width), hidden)
        full = full[:, : self.length]
        self.base, self.history = full, []  # later states start from here (re-applying this one is harmless)
        return full

    def to_full(self, values: Tensor) -> Tensor:
        """B x K values of the packed tokens -> B x N (zeros at tokens not computed)."""
        full = values.new_zeros(values.shape[0], self.length + 1).scatter(1, self.positions, values)
        return full[:, : self.length]

    def received_attention(self) -> Tensor:
        """B x N: ``received_attention`` of the last layer, computed on the packed tokens."""
        queries = self.valid.to(self.probs.dtype)
        total = torch.einsum("bq,bqk->bk", queries, self.probs.mean(1))
        return self.to_full(total / queries.sum(1, keepdim=True).clamp(min=1))

    def full_probs(self) -> Tensor:
        """B x H x N x N: the last layer's probabilities in full coordinates (zeros elsewhere)."""
        probs, positions, length = self.probs, self.positions, self.length
        batch, heads, slots, _ = probs.shape
        cols = positions[:, None, None, :].expand(batch, heads, slots, slots)
        wide = probs.new_zeros(batch, heads, slots, length + 1).scatter(3, cols, probs)
        rows = positions[:, None, :, None].expand(batch, heads, slots, length + 1)
        full = probs.new_zeros(batch, heads, length + 1, length + 1).scatter(2, rows, wide)
        return full[:, :, :length, :length]


class PrunableEncoder(nn.Module):
    """Embeddings + BERT layers of a pretrained model, run with a pruning hook per layer.

    ``soft_rule`` (a key of ``SOFT_RULES``) chooses how soft mode applies mask values to
    attention keys; hard mode always removes dropped tokens. ``output`` chooses what
    ``EncoderOutput.hidden`` holds: ``"all"`` every token's final state (B x N x d), ``"cls"``
    [CLS]'s only (B x 1 x d: what a sequence classifier reads; in hard mode nothing is
    scattered back to full length).
    """

    OUTPUTS = ("all", "cls")

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
        output_attentions: bool | Collection[int] = False,
        output: str = "all",
    ) -> EncoderOutput:
        pruner = pruner if pruner is not None else KeepAll()
        hard = (not self.training) if hard is None else hard
        if soft_rule not in SOFT_RULES:
            raise ValueError(f"soft_rule must be one of {', '.join(SOFT_RULES)}, not {soft_rule!r}")
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(self.OUTPUTS)}, not {output!r}")
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        padding = attention_mask.to(hidden.dtype)
        if hard:
            return self._hard_forward(hidden, padding, pruner, output_attentions, output)
        keep, probs = padding, None
        keeps, attentions = [], []
        for index, layer in enumerate(self.layers):
            proposed = pruner(PruneContext(index, hidden, keep, probs, padding))
            keep = self._cumulative(pruner, proposed, keep, padding)
            read = self._wants_probs(output_attentions, index) or self._next_reads_attention(pruner, index)
            hidden, probs = self._soft_layer(layer, hidden, keep, padding, soft_rule, fused=not read)
            keeps.append(keep)
            attentions.append(probs)
        return EncoderOutput(hidden if output == "all" else hidden[:, :1], keeps, attentions, padding, hard=False)

    @staticmethod
    def _wants_probs(output_attentions: bool | Collection[int], index: int) -> bool:
        """``output_attentions``: True (every layer's), False (none) or the layers whose are wanted."""
        if isinstance(output_attentions, bool):
            return output_attentions
        return index in output_attentions

    def _next_reads_attention(self, pruner: Pruner, index: int) -> bool:
        """Whether the pruner's call before the next layer reads layer ``index``'s probabilities
        (after the last layer no call comes)."""
        return index + 1 < len(self.layers) and pruner.wants_attention(index + 1)

    @staticmethod
    def _cumulative(pruner: Pruner, proposed: Tensor, keep: Tensor, padding: Tensor) -> Tensor:
        """The proposal times the running mask, [CLS] pinned (padding is 0 in the running mask)."""
        history = (keep > 0).to(keep.dtype) if pruner.binary_history else keep
        return torch.cat([padding[:, :1], (proposed * history)[:, 1:]], dim=1)

    def _hard_forward(
        self, hidden: Tensor, padding: Tensor, pruner: Pruner, output_attentions: bool, output: str
    ) -> EncoderOutput:
        """Hard mode on packed tokens: repack only before layers whose pruner decides, scatter
        nothing back unless asked. Traceable: see the module docstring."""
        keep = padding
        state = PackedTokens.start(hidden, padding > 0)
        keeps, attentions = [], []
        for index, layer in enumerate(self.layers):
            decides = pruner.decides(index)
            if decides:  # before the first decision the input's own layout: its padding slots are invalid keys
                proposed = pruner(PruneContext(index, None, keep, None, padding, packed=state))
                keep = (self._cumulative(pruner, proposed, keep, padding) > 0.5).to(hidden.dtype)
                state = state.select(keep)
            want_probs = self._wants_probs(output_attentions, index) or self._next_reads_attention(pruner, index)
            # fused only when run eagerly: a trace (fvcore's count, ONNX export) sees the eager ops
            fused = not want_probs and not torch.jit.is_tracing()
            if not want_probs and exporting_fused():  # ONNX Runtime's fused attention operator
                context = exported_attention(layer.attention.self, state.hidden, state.valid)
                out, probs = layer.feed_forward_chunk(layer.attention.output(context, state.hidden)), None
            else:
                out, probs = self.run_layer(layer, state.hidden, self.key_bias(state.valid, hidden.dtype), fused=fused)
            state = state.ran(out, probs)
            keeps.append(keep)
            attentions.append(state.full_probs if want_probs else None)
        final = state.full_hidden() if output == "all" else state.hidden[:, :1]  # [CLS] is slot 0, always kept
        return EncoderOutput(final, keeps, Lazy(attentions), padding, hard=True)

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
    def run_layer(
        cls,
        layer: nn.Module,
        hidden: Tensor,
        key_bias: Tensor,
        key_weight: Tensor | None = None,
        renormalise: bool = True,
        fused: bool = False,
    ):
        """One BERT layer from its own modules, returning the attention probabilities too.

        ``key_weight`` (B x N, optional) scales each key's attention probability, then
        renormalises over keys (``renormalise``) or not (Transkimmer's reference rule).
        ``fused``: torch's ``scaled_dot_product_attention`` instead, returning no probabilities
        (no ``key_weight``); fvcore does not count it, so the FLOPs counter traces the eager path.
        """
        attn = layer.attention.self
        batch, length, _ = hidden.shape
        shape = (batch, length, attn.num_attention_heads, attn.attention_head_size)
        query = attn.query(hidden).view(shape).transpose(1, 2)
        key = attn.key(hidden).view(shape).transpose(1, 2)
        value = attn.value(hidden).view(shape).transpose(1, 2)
        if fused:
            if key_weight is not None:
                raise ValueError("fused attention takes no key_weight")
            dropout = attn.dropout.p if attn.training else 0.0
            context, probs = (
                F.scaled_dot_product_attention(
                    query, key, value, attn_mask=key_bias, dropout_p=dropout, scale=attn.scaling
                ),
                None,
            )
        else:
            scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling + key_bias
            if key_weight is None:
                probs = scores.softmax(-1)
            elif renormalise:
                probs = cls._weighted_softmax(scores, key_weight)
            else:
                probs = scores.softmax(-1) * key_weight[:, None, None, :]
            context = torch.matmul(attn.dropout(probs), value)
        context = context.transpose(1, 2).reshape(batch, length, -1)
        attention_output = layer.attention.output(context, hidden)
        return layer.feed_forward_chunk(attention_output), probs

    def _soft_layer(self, layer, hidden, keep, padding, soft_rule, fused: bool = False):
        """One layer in soft mode. ``fused`` (nobody reads its probabilities): where the mask needs no
        gradient and the rule renormalises, the key weighting is ``softmax(s + log m)`` (equal to
        ``p*m / sum(p*m)`` for any m >= 0) inside torch's fused attention; a mask that carries a
        gradient, or the post-softmax rule, keeps the eager path (its gradient at m = 0 is finite).
        Under a trace (fvcore) it stays eager, as in hard mode."""
        if fused and not keep.requires_grad and soft_rule == "renormalised" and not torch.jit.is_tracing():
            weight = torch.where(
                keep > 0, keep.clamp(min=torch.finfo(keep.dtype).tiny).log(), torch.finfo(hidden.dtype).min
            )
            out, probs = self.run_layer(layer, hidden, weight[:, None, None, :].to(hidden.dtype), fused=True)
            k = keep.unsqueeze(-1)
            return k * out + (1 - k) * hidden, probs
        bias = self.key_bias(padding > 0, hidden.dtype)
        out, probs = self.run_layer(layer, hidden, bias, keep, renormalise=soft_rule == "renormalised")
        k = keep.unsqueeze(-1)
        return k * out + (1 - k) * hidden, probs
