"""Self-attention that exports as ONNX Runtime's fused ``com.microsoft.Attention`` operator.

Why: ONNX Runtime's transformer optimizer fuses attention only where it recognises the whole
subgraph, including a mask computed from the graph's ``attention_mask`` input. In a pruned graph
the mask of a layer is the packed tokens' validity, computed inside the graph, so no layer's
attention was fused (48 MatMul and 6 Softmax left for 6 layers) while transformers' own export of
the unpruned model was. Emitting the fused operator at export time gives every layer whose
attention probabilities nobody reads the same operator as the optimised unpruned graph (its
projections, scores, softmax and context in one kernel), whatever computed its mask.

In eager mode (and while tracing, for the output values) it computes the same attention with
torch's ``scaled_dot_product_attention``: exporting changes the operator, not the numbers. Layers
whose probabilities a pruner reads (importance from received attention: ToP, static top-k) keep
the plain operators, since the fused operator returns no probabilities.

The operator (ONNX Runtime contrib, domain ``com.microsoft``, version 1): inputs ``input``
(B x S x hidden), ``weights`` (hidden x 3 hidden: Q, K, V projections side by side), ``bias``
(3 hidden) and ``mask_index`` (B x S int32: 1 for a key that may be attended), attributes
``num_heads`` and ``scale``; output B x S x hidden. Graphs that use it run in ONNX Runtime only
(``export fused=false`` writes standard operators instead).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

DOMAIN = "com.microsoft"
_enabled = [True]


def exporting_fused() -> bool:
    """True inside an ONNX export that may use the fused operator (see ``standard_operators``)."""
    return _enabled[0] and torch.onnx.is_in_onnx_export()


@contextmanager
def standard_operators():
    """Export attention as plain ONNX operators (for runtimes other than ONNX Runtime)."""
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = True


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weights: Tensor, bias: Tensor, mask: Tensor, num_heads: int, scale: float):
        batch, length, width = hidden.shape
        q, k, v = (hidden @ weights + bias).split(width, dim=-1)
        heads = [t.view(batch, length, num_heads, width // num_heads).transpose(1, 2) for t in (q, k, v)]
        context = F.scaled_dot_product_attention(*heads, attn_mask=(mask != 0)[:, None, None, :], scale=scale)
        return context.transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, hidden, weights, bias, mask, num_heads: int, scale: float):
        out = g.op(f"{DOMAIN}::Attention", hidden, weights, bias, mask, num_heads_i=num_heads, scale_f=scale)
        out.setType(hidden.type())
        return out


def exported_attention(attn: nn.Module, hidden: Tensor, visible: Tensor) -> Tensor:
    """BERT self-attention (``BertSelfAttention``-like ``attn``: query/key/value Linear layers) on
    ``hidden`` (B x S x d) with keys ``visible`` (B x S bool): the context B x S x d, before the
    output projection. Exports as one ``com.microsoft.Attention``; eval mode only (no dropout)."""
    weights = torch.cat([attn.query.weight.T, attn.key.weight.T, attn.value.weight.T], dim=1)
    bias = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
    return _Attention.apply(hidden, weights, bias, visible.to(torch.int32), attn.num_attention_heads, attn.scaling)
