"""FLOPs of the prunable encoder, counted by fvcore.

Convention (fvcore's, the papers' "MACs"): one fused multiply-add = one FLOP. fvcore sees
our attention matmuls because the encoder computes attention itself (eager); elementwise
ops (softmax, scaling, GELU) are not counted, layer norms are (5 per element).

A layer's FLOPs depend only on the length of the sequence it runs on, so each length is
traced once (one example, eval mode, no grad, RNG untouched) and cached. The FLOPs of any
keep pattern are then lookups: per example and layer, the layer's cost at the number of
tokens it kept. Hard mode runs exactly those lengths, so this is the compute it does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from tokprune.core.encoder import EncoderOutput, PrunableEncoder, Pruner


def fvcore_flops(module: nn.Module, inputs: tuple[Tensor, ...]) -> int:
    """Total fvcore FLOPs of ``module(*inputs)``, with its warnings silenced."""
    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return int(analysis.total())


@contextmanager
def quiet_trace(module: nn.Module):
    """Eval mode, no grad and a forked RNG while tracing, then restore every module's mode."""
    modes = {m: m.training for m in module.modules()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module.eval()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class _OneLayer(nn.Module):
    """Layer ``index`` of the encoder as fvcore sees it: hidden (1 x n x d) -> hidden."""

    def __init__(self, encoder: PrunableEncoder, index: int):
        super().__init__()
        self.encoder, self.index = encoder, index

    def forward(self, hidden: Tensor) -> Tensor:
        bias = hidden.new_zeros(hidden.shape[0], 1, 1, hidden.shape[1])
        return self.encoder.run_layer(self.encoder.layers[self.index], hidden, bias)[0]


class _PerToken(nn.Module):
    """A pruner's per-token module (e.g. a skim predictor) on hidden (1 x n x d)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, hidden: Tensor) -> Tensor:
        return self.module(hidden)


class _Embeddings(nn.Module):
    def __init__(self, encoder: PrunableEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.encoder.embeddings(input_ids=input_ids)


@dataclass
class BatchFlops:
    """FLOPs of one batch (summed over its examples) and the two references."""

    pruned: float  # what the layers compute with the batch's keep masks, real lengths
    unpruned_real: float  # every real token through every layer
    unpruned_padded: float  # every example at the task's max length (the papers' reference)
    per_layer: Tensor  # L: pruned FLOPs of each layer

    @property
    def ratio_real(self) -> float:
        return self.pruned / self.unpruned_real

    @property
    def ratio_padded(self) -> float:
        return self.pruned / self.unpruned_padded


def _signature(module: nn.Module) -> tuple:
    return (type(module).__name__, *(tuple(p.shape) for p in module.parameters()))


class FlopsCounter:
    """Per-layer fvcore FLOPs of an encoder (and its pruner) by input length, cached.

    Modules with the same type and parameter shapes (all of a BERT's layers; all of a
    method's per-layer predictors) are one *kind* and share a row of the table; the
    embeddings have a row of their own. Each (row, length) is traced once; everything
    else is vectorised lookups.

    A pruner's own per-token work (``Pruner.cost_module``) is charged to the layer it
    decides for, at the number of tokens alive when it runs (the previous layer's kept
    count). The unpruned references have no pruner.
    """

    def __init__(self, encoder: PrunableEncoder, pruner: Pruner | None = None):
        self.encoder = encoder
        layers = [_OneLayer(encoder, index) for index in range(encoder.num_layers)]
        costs = [pruner.cost_module(index) if pruner is not None else None for index in range(encoder.num_layers)]
        signatures = [_signature(layer) for layer in encoder.layers]
        rows: dict[tuple, nn.Module] = {}
        for signature, module in zip(signatures, layers):
            rows.setdefault(("layer", signature), module)
        rows[("embeddings",)] = _Embeddings(encoder)
        for module in costs:
            if module is not None:
                rows.setdefault(("pruner", _signature(module)), _PerToken(module))
        rows[("nothing",)] = None
        keys = list(rows)
        self._modules = list(rows.values())
        self._layer_rows = torch.tensor([keys.index(("layer", s)) for s in signatures])
        self._embedding_row = keys.index(("embeddings",))
        self._pruner_rows = torch.tensor(
            [keys.index(("pruner", _signature(m)) if m is not None else ("nothing",)) for m in costs]
        )
        self.has_pruner_cost = any(m is not None for m in costs)
        self._table = torch.zeros(len(self._modules), 1, dtype=torch.float64)  # row x length
        self._known = torch.ones(1, dtype=torch.bool)  # length 0 costs nothing

    def _example(self, module: nn.Module, length: int) -> Tensor:
        """A zero input of ``length`` tokens for a module's trace."""
        param = next(self.encoder.parameters())
        if isinstance(module, _Embeddings):
            return torch.zeros(1, length, dtype=torch.long, device=param.device)
        return torch.zeros(1, length, self.encoder.config.hidden_size, dtype=param.dtype, device=param.device)

    def _ensure(self, lengths: Tensor) -> None:
        """Trace every length not yet in the table, for every row."""
        needed = int(lengths.max()) + 1
        if needed > len(self._known):
            grow = needed - len(self._known)
            self._table = torch.cat([self._table, self._table.new_zeros(len(self._modules), grow)], dim=1)
            self._known = torch.cat([self._known, self._known.new_zeros(grow)])
        missing = [int(n) for n in lengths.unique() if not self._known[int(n)]]
        if not missing:
            return
        with quiet_trace(nn.ModuleList(m for m in self._modules if m is not None)):
            for row, module in enumerate(self._modules):
                if module is None:
                    continue
                for length in missing:
                    self._table[row, length] = fvcore_flops(module, (self._example(module, length),))
        self._known[missing] = True

    def layer(self, index: int, length: int) -> float:
        """FLOPs of layer ``index`` on one example of ``length`` tokens."""
        return float(self.per_layer(torch.tensor([[length]]).expand(len(self._layer_rows), 1))[index, 0])

    def embeddings(self, lengths: Tensor) -> Tensor:
        """B: FLOPs of the embeddings (their layer norm) for examples of these lengths."""
        lengths = lengths.detach().long().cpu()
        self._ensure(lengths)
        return self._table[self._embedding_row, lengths]

    def per_layer(self, counts: Tensor) -> Tensor:
        """L x B tokens each layer computed -> L x B FLOPs."""
        counts = counts.detach().long().cpu()
        self._ensure(counts)
        return torch.gather(self._table[self._layer_rows], 1, counts)

    def unpruned(self, lengths: Tensor) -> float:
        """Every layer on every real token of each example, embeddings included."""
        lengths = lengths.detach().long().cpu()
        full = lengths.expand(len(self._layer_rows), -1)
        return float(self.per_layer(full).sum() + self.embeddings(lengths).sum())

    def pruner_cost(self, counts: Tensor, lengths: Tensor) -> Tensor:
        """L x B FLOPs of the pruner's decisions: before layer l it sees layer l-1's tokens."""
        entering = torch.cat([lengths[None], counts[:-1]]).detach().long().cpu()
        self._ensure(entering)
        return torch.gather(self._table[self._pruner_rows], 1, entering)

    def coefficients(self) -> Tensor:
        """rows x 3: each row's FLOPs as ``c0 + c1*n + c2*n^2`` in the length n, solved from its
        traces at n = 1, 2, 3. Exact: a BERT layer's counted ops are linear maps (n), attention's
        two matmuls (n^2) and layer norms (n), so the table and the polynomial agree at every
        length (tests/test_flops.py checks one far from 1..3)."""
        if getattr(self, "_coefficients", None) is None:
            self._ensure(torch.tensor([1, 2, 3]))
            vandermonde = torch.tensor([[1.0, n, n * n] for n in (1, 2, 3)], dtype=torch.float64)
            self._coefficients = torch.linalg.solve(vandermonde, self._table[:, 1:4].T).T
        return self._coefficients

    def expected_ratio(self, counts: Tensor, lengths: Tensor) -> Tensor:
        """The FLOPs ratio at real length of a batch whose layers compute ``counts`` (L x B, may be
        fractional and carry gradients: expected kept tokens from soft decisions), against the same
        examples unpruned, as ``batch().ratio_real`` aggregates it (FLOPs summed over the batch, the
        pruner's own cost and the embeddings included). For whole counts it *is* that ratio: the
        differentiable twin of the measured one, the one FLOPs model every method's target uses."""
        coefficients = self.coefficients().to(device=counts.device, dtype=counts.dtype)

        def cost(rows: Tensor, n: Tensor) -> Tensor:
            c = coefficients[rows.to(counts.device)]
            return c[:, :1] + c[:, 1:2] * n + c[:, 2:3] * n * n

        lengths = lengths.to(counts.dtype)
        pruned = cost(self._layer_rows, counts).sum()
        if self.has_pruner_cost:  # before layer l the pruner sees the tokens layer l-1 computed
            entering = torch.cat([lengths[None].expand(1, -1), counts[:-1]])
            pruned = pruned + cost(self._pruner_rows, entering).sum()  # layers without one: a row of zeros
        fixed = self.embeddings(lengths).sum()
        return (pruned + float(fixed)) / self.unpruned(lengths)

    def batch(self, out: EncoderOutput, max_length: int) -> BatchFlops:
        """FLOPs of a batch the encoder ran, with both references."""
        lengths = out.lengths.detach().long().cpu()
        counts = out.kept_counts()
        per_layer = self.per_layer(counts)
        if self.has_pruner_cost:
            per_layer = per_layer + self.pruner_cost(counts.cpu(), lengths)
        per_layer = per_layer.sum(1)
        return BatchFlops(
            pruned=float(per_layer.sum() + self.embeddings(lengths).sum()),
            unpruned_real=self.unpruned(lengths),
            unpruned_padded=len(lengths) * self.unpruned(torch.tensor([max_length])),
            per_layer=per_layer,
        )


def analytic_layer_macs(length: float, hidden: int, heads: int, intermediate: int) -> float:
    """METHODS.md's MAC formula for one BERT layer on ``length`` tokens (ToP's constraint).

    Attention: ``H*(3*n*d*d_h + 2*n^2*d_h + n^2) + n*d^2``; feed-forward: ``2*n*d*d_ff``.
    """
    head = hidden // heads
    attention = heads * (3 * length * hidden * head + 2 * length**2 * head + length**2) + length * hidden**2
    return attention + 2 * length * hidden * intermediate
