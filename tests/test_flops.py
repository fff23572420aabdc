"""FLOPs: cached per-length lookups agree with direct fvcore traces and with the MAC formula."""

import pytest
import torch
from test_encoder import FixedMasks
from torch import nn

from tokprune.core.encoder import KeepAll, PrunableEncoder
from tokprune.core.flops import FlopsCounter, analytic_layer_macs, fvcore_flops

from conftest import random_batch, tiny_bert


class WholeEncoder(nn.Module):
    """The full encoder forward as fvcore sees it (tensors in, tensor out), hard mode."""

    def __init__(self, encoder, pruner):
        super().__init__()
        self.encoder, self.pruner = encoder, pruner

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask, pruner=self.pruner, hard=True).hidden


def one_example(length: int, vocab: int = 120):
    batch = random_batch(batch=1, length=length, vocab=vocab)
    return batch["input_ids"], batch["attention_mask"]


def direct(encoder, pruner, inputs) -> int:
    encoder.eval()
    with torch.no_grad():
        return fvcore_flops(WholeEncoder(encoder, pruner), inputs)


def cached_total(counter: FlopsCounter, encoder, pruner, inputs) -> float:
    with torch.no_grad():
        out = encoder(*inputs, pruner=pruner, hard=True)
    return counter.batch(out, max_length=inputs[0].shape[1]).pruned


def check_against_direct_traces(bert, length):
    encoder = PrunableEncoder(bert).eval()
    counter = FlopsCounter(encoder)
    inputs = one_example(length, bert.config.vocab_size)
    unpruned = direct(encoder, KeepAll(), inputs)
    assert cached_total(counter, encoder, KeepAll(), inputs) == pytest.approx(unpruned, rel=0.005)
    layers = bert.config.num_hidden_layers
    masks = {l: (torch.arange(length) % (l + 2) != 1).float()[None] for l in range(1, layers)}
    pruned = direct(encoder, FixedMasks(masks), inputs)
    assert pruned < unpruned
    assert cached_total(counter, encoder, FixedMasks(masks), inputs) == pytest.approx(pruned, rel=0.01)
    return counter, unpruned


def test_cached_lookups_equal_direct_traces_on_the_tiny_model():
    check_against_direct_traces(tiny_bert(layers=3), length=20)


@pytest.mark.slow
def test_cached_direct_and_analytic_agree_on_the_real_backbone():
    from tokprune.config import compose
    from tokprune.core.backbone import load_bert

    bert = load_bert(compose([]).model)
    length = 48
    counter, unpruned = check_against_direct_traces(bert, length)
    c = bert.config
    analytic = c.num_hidden_layers * analytic_layer_macs(
        length, c.hidden_size, c.num_attention_heads, c.intermediate_size
    )
    assert unpruned == pytest.approx(analytic, rel=0.03)
    for n in (8, 64, 128):
        assert counter.layer(0, n) == pytest.approx(
            analytic_layer_macs(n, c.hidden_size, c.num_attention_heads, c.intermediate_size), rel=0.03
        )


def test_each_length_is_traced_once(monkeypatch):
    import tokprune.core.flops as flops

    traced = []
    real = flops.fvcore_flops
    monkeypatch.setattr(flops, "fvcore_flops", lambda m, inputs: traced.append(inputs[0].shape[1]) or real(m, inputs))
    counter = FlopsCounter(PrunableEncoder(tiny_bert(layers=3)))  # 3 identical layers: one kind
    counts = torch.tensor([[5, 7], [5, 7], [3, 7]])
    first = counter.per_layer(counts)
    assert sorted(traced) == [3, 3, 5, 5, 7, 7]  # the layer kind and the embeddings, once per length
    assert torch.equal(counter.per_layer(counts), first) and len(traced) == 6
    assert first[0, 0] == first[1, 0] and first[2, 0] < first[0, 0]


def test_tracing_does_not_disturb_training_state():
    bert = tiny_bert(layers=2).train()
    encoder = PrunableEncoder(bert).train()
    counter = FlopsCounter(encoder)
    rng = torch.get_rng_state()
    counter.per_layer(torch.tensor([[9], [4]]))
    counter.embeddings(torch.tensor([9, 3]))
    assert torch.equal(rng, torch.get_rng_state())
    assert all(m.training for m in encoder.modules())
    assert all(p.grad is None for p in encoder.parameters())


def test_ratios_against_real_and_padded_references():
    bert = tiny_bert(layers=3)
    encoder = PrunableEncoder(bert).eval()
    counter = FlopsCounter(encoder)
    batch = random_batch(batch=4, length=16)
    with torch.no_grad():
        full = encoder(batch["input_ids"], batch["attention_mask"], pruner=KeepAll(), hard=True)
        half = encoder(
            batch["input_ids"],
            batch["attention_mask"],
            pruner=FixedMasks({1: (torch.arange(16) < 6).float().expand(4, -1)}),
            hard=True,
        )
    unpruned = counter.batch(full, max_length=32)
    assert unpruned.ratio_real == pytest.approx(1.0)
    assert unpruned.ratio_padded < 0.5  # 16 of 32 positions at most, attention is quadratic
    pruned = counter.batch(half, max_length=32)
    assert pruned.ratio_real < 1.0 and pruned.unpruned_real == unpruned.unpruned_real
    assert pruned.per_layer[0] == unpruned.per_layer[0] and pruned.per_layer[1] < unpruned.per_layer[1]


def test_a_pruners_own_work_is_charged_at_the_tokens_it_sees():
    from tokprune.methods.transkimmer import SkimPruner

    bert = tiny_bert(layers=3)
    encoder = PrunableEncoder(bert).eval()
    pruner = SkimPruner(32, 3, first_skim_layer=1, tau=1.0, keep_bias=5.0, hidden_init_std=0.02).eval()
    batch = random_batch(batch=3, length=16)
    with torch.no_grad():
        out = encoder(batch["input_ids"], batch["attention_mask"], pruner=pruner, hard=True)
    plain = FlopsCounter(encoder).batch(out, max_length=16)
    charged = FlopsCounter(encoder, pruner).batch(out, max_length=16)
    predictor = fvcore_flops(pruner.predictors[0], (torch.zeros(1, 10, 32),)) / 10  # linear in tokens
    entering = out.kept_counts()[0].sum()  # the predictor before layer 1 sees layer 0's tokens
    assert charged.per_layer[0] == plain.per_layer[0]  # no predictor before layer 0
    assert charged.per_layer[1] - plain.per_layer[1] == pytest.approx(predictor * float(entering))
    assert charged.unpruned_real == plain.unpruned_real and charged.ratio_real > plain.ratio_real
