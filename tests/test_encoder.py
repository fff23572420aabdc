"""The prunable encoder: equal to the backbone when nothing is pruned; hard == soft."""

import warnings

import pytest
import torch

from tokprune.core.encoder import EncoderOutput, KeepAll, PrunableEncoder, Pruner, received_attention

from conftest import random_batch, tiny_bert


class FixedMasks(Pruner):
    """Applies a given B x N mask per layer (tests the encoder's rules, not a method)."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        super().__init__()
        self.masks = masks
        self.seen_probs: list = []

    def forward(self, ctx):
        self.seen_probs.append(ctx.attn_probs)
        return self.masks.get(ctx.layer, torch.ones_like(ctx.keep))


def random_masks(batch: dict, layers: int, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = batch["input_ids"].shape
    return {l: (torch.rand(shape, generator=g) > 0.3).float() for l in range(1, layers)}


def run(encoder, batch, **kw) -> EncoderOutput:
    return encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kw)


def test_keep_all_equals_the_backbone_forward():
    bert = tiny_bert()
    batch = random_batch()
    expected = bert(**batch).last_hidden_state
    for hard in (False, True):
        out = run(PrunableEncoder(bert), batch, pruner=KeepAll(), hard=hard)
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(out.hidden[real], expected[real], atol=1e-5, rtol=0)


def test_masks_are_cumulative_pin_cls_and_drop_padding():
    bert = tiny_bert(layers=4)
    batch = random_batch(batch=6, length=16)
    masks = random_masks(batch, 4)
    masks[2][:, 0] = 0  # ask to drop [CLS]: must be ignored
    out = run(PrunableEncoder(bert), batch, pruner=FixedMasks(masks), hard=False)
    padding = batch["attention_mask"].float()
    for l in range(1, 4):
        assert torch.all(out.keep[l] <= out.keep[l - 1])
        assert torch.all(out.keep[l][:, 0] == 1)
        assert torch.all(out.keep[l][padding == 0] == 0)


def test_dropped_tokens_carry_their_last_state_to_the_output():
    bert = tiny_bert(layers=3)
    batch = random_batch(batch=2, length=10)
    enc = PrunableEncoder(bert)
    drop = torch.ones(2, 10)
    drop[:, 3] = 0  # token 3 skips layers 1 and 2
    out = run(enc, batch, pruner=FixedMasks({1: drop}), hard=False)
    first_layer_only = PrunableEncoder(bert)
    first_layer_only.layers = bert.encoder.layer[:1]
    after_layer0 = run(first_layer_only, batch, hard=False).hidden
    torch.testing.assert_close(out.hidden[:, 3], after_layer0[:, 3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_mode_equals_soft_mode_for_random_binary_masks(seed):
    bert = tiny_bert(seed=seed, layers=4)
    batch = random_batch(batch=5, length=14, seed=seed)
    masks = random_masks(batch, 4, seed=seed)
    enc = PrunableEncoder(bert).eval()
    soft = run(enc, batch, pruner=FixedMasks(masks), hard=False)
    hard = run(enc, batch, pruner=FixedMasks(masks), hard=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hard.hidden[real], soft.hidden[real], atol=1e-4, rtol=0)
    for ks, kh in zip(soft.keep, hard.keep):
        assert torch.equal(ks, kh)
    # the attention a pruner sees is the same in both modes, in full coordinates
    assert hard.attentions[-1] is None and soft.attentions[-1] is None  # no pruner call after the last layer
    for keep, ps, ph in zip(hard.keep[:-1], soft.attentions[:-1], hard.attentions[:-1]):
        rows = keep.bool()  # queries the layer computed
        torch.testing.assert_close(ph.transpose(1, 2)[rows], ps.transpose(1, 2)[rows], atol=1e-5, rtol=0)
        assert torch.all(ph.transpose(1, 2)[~rows] == 0)


def test_hard_mode_packs_examples_to_the_largest_kept_count():
    bert = tiny_bert(layers=2)
    batch = random_batch(batch=3, length=12)
    mask = torch.ones(3, 12)
    mask[0, 6:] = 0  # example 0 keeps 6 tokens at layer 1, others keep all real ones
    seen = []
    layer = bert.encoder.layer[1].attention.self.query
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    run(PrunableEncoder(bert).eval(), batch, pruner=FixedMasks({1: mask}), hard=True)
    handle.remove()
    assert seen == [int(batch["attention_mask"][1:].sum(1).max())]


def test_received_attention_averages_heads_and_kept_queries():
    probs = torch.zeros(1, 2, 3, 3)
    probs[0, 0, :, 1] = 1.0  # head 0: every query attends to token 1
    probs[0, 1, :, 2] = 1.0  # head 1: to token 2
    keep = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(received_attention(probs, keep), torch.tensor([[0.0, 0.5, 0.5]]))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sst2", "mrpc"])
def test_real_backbone_keep_all_and_hard_equals_soft_on_real_rows(task, glue_dir):
    from tokprune.config import compose
    from tokprune.core.backbone import load_bert, load_tokenizer
    from tokprune.core.data import get_task, read_glue_tsv

    from conftest import GLUE

    cfg = compose([f"task={task}"])
    spec = get_task(task)
    rows = read_glue_tsv(GLUE / spec.folder / spec.dev_file, spec)
    texts = [rows["text_a"][:8]] + ([rows["text_b"][:8]] if "text_b" in rows else [])
    batch = dict(load_tokenizer(cfg.model)(*texts, padding=True, return_tensors="pt"))
    bert = load_bert(cfg.model).eval()
    encoder = PrunableEncoder(bert).eval()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = bert(**batch).last_hidden_state
        unpruned = run(encoder, batch, hard=True)
        masks = random_masks(batch, bert.config.num_hidden_layers, seed=1)
        soft = run(encoder, batch, pruner=FixedMasks(masks), hard=False)
        hard = run(encoder, batch, pruner=FixedMasks(masks), hard=True)
    torch.testing.assert_close(unpruned.hidden[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(hard.hidden[real], soft.hidden[real], atol=1e-4, rtol=0)
    assert hard.kept_counts()[-1].sum() < unpruned.kept_counts()[-1].sum()


def test_post_softmax_rule_is_not_hard_equivalent():
    """Transkimmer's reference rule drops dropped keys' probability mass without renormalising."""
    bert = tiny_bert(seed=3, layers=3)
    batch = random_batch(batch=4, length=12, seed=3)
    masks = random_masks(batch, 3, seed=3)
    enc = PrunableEncoder(bert).eval()
    hard = run(enc, batch, pruner=FixedMasks(masks), hard=True)
    reference = run(enc, batch, pruner=FixedMasks(masks), hard=False, soft_rule="post_softmax")
    real = batch["attention_mask"].bool()
    assert (hard.hidden[real] - reference.hidden[real]).abs().max() > 1e-3


def test_unknown_soft_rule_is_rejected():
    batch = random_batch()
    with pytest.raises(ValueError, match="soft_rule"):
        run(PrunableEncoder(tiny_bert()), batch, soft_rule="magic")


def test_straight_through_mask_gets_a_finite_nonzero_gradient_where_it_is_zero():
    """The renormalised rule lets a dropped token learn that it should have been kept."""
    bert = tiny_bert(seed=4, layers=3)
    batch = random_batch(batch=2, length=10, seed=4)
    soft = torch.full((2, 10), 0.3, requires_grad=True)
    hard_values = torch.ones(2, 10)
    hard_values[:, 4] = 0  # token 4 dropped before layer 1
    mask = hard_values + soft - soft.detach()  # forward binary, gradient to `soft` (straight-through)

    class StraightThrough(Pruner):
        def forward(self, ctx):
            return mask if ctx.layer == 1 else ctx.keep

    out = run(PrunableEncoder(bert).eval(), batch, pruner=StraightThrough(), hard=False)
    # A fixed random readout of [CLS]'s final state, which reaches token 4 only through attention.
    # (Not a plain sum: the sum of a LayerNorm output is its bias's sum whatever the input, so its
    # gradient is zero up to rounding and the test would pass or fail on float noise.)
    readout = torch.randn(out.hidden.shape[-1], generator=torch.Generator().manual_seed(4))
    (out.hidden[:, 0] @ readout).sum().backward()
    grad = soft.grad[:, 4]
    assert torch.isfinite(grad).all() and (grad.abs() > 1e-4).all()


# -- hard mode on packed tokens: output="cls", fused attention, lazy full-size views ---------------


class ReadsNothing(FixedMasks):
    """Fixed masks from a pruner that reads no attention: hard mode may run fused attention."""

    needs_attention = False


class ChecksPackedViews(Pruner):
    """Drops the tokens that received the least attention, after checking that the packed
    shortcuts equal their full-size definitions."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def forward(self, ctx):
        if ctx.layer == 0:
            return ctx.keep
        packed_importance, packed_hidden = ctx.received_attention(), ctx.live_hidden()
        torch.testing.assert_close(packed_importance, received_attention(ctx.attn_probs, ctx.keep), atol=1e-6, rtol=0)
        torch.testing.assert_close(packed_hidden, ctx.hidden[ctx.live], atol=0, rtol=0)
        self.checked += 1
        scores = packed_importance.masked_fill(~ctx.live, 2.0)
        return (scores > scores.min(1, keepdim=True).values).to(ctx.keep.dtype)


def test_output_cls_is_the_first_row_of_output_all_in_both_modes():
    bert = tiny_bert(seed=5, layers=4)
    batch = random_batch(batch=5, length=14, seed=5)
    masks = random_masks(batch, 4, seed=5)
    enc = PrunableEncoder(bert).eval()
    for hard in (False, True):
        full = run(enc, batch, pruner=FixedMasks(masks), hard=hard)
        cls = run(enc, batch, pruner=FixedMasks(masks), hard=hard, output="cls")
        assert cls.hidden.shape == (5, 1, 32)
        torch.testing.assert_close(cls.hidden[:, 0], full.hidden[:, 0], atol=1e-6, rtol=0)
        assert torch.equal(cls.kept_counts(), full.kept_counts())
    with pytest.raises(ValueError, match="output"):
        run(enc, batch, output="pooled")


def test_hard_mode_with_fused_attention_equals_soft_mode(monkeypatch):
    from tokprune.core import encoder as encoder_module

    calls = []
    sdpa = encoder_module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        encoder_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    bert = tiny_bert(seed=6, layers=4)
    batch = random_batch(batch=5, length=14, seed=6)
    masks = random_masks(batch, 4, seed=6)
    enc = PrunableEncoder(bert).eval()
    soft = run(enc, batch, pruner=ReadsNothing(masks), hard=False)
    assert len(calls) == 4  # masks without a gradient, probabilities unread: soft mode fuses too (log-mask bias)
    eager = run(enc, batch, pruner=ReadsNothing(masks), hard=False, output_attentions=True)
    assert len(calls) == 4 and all(p is not None for p in eager.attentions)  # asked for: the eager weighting
    torch.testing.assert_close(soft.hidden, eager.hidden, atol=1e-5, rtol=0)
    calls.clear()
    hard = run(enc, batch, pruner=ReadsNothing(masks), hard=True)
    assert len(calls) == 4 and all(p is None for p in hard.attentions)  # nobody reads them: fused, none kept
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hard.hidden[real], soft.hidden[real], atol=1e-4, rtol=0)
    assert torch.equal(hard.kept_counts(), soft.kept_counts())
    calls.clear()
    asked = run(enc, batch, pruner=ReadsNothing(masks), hard=True, output_attentions=True)
    assert calls == [] and all(p is not None for p in asked.attentions)  # asked for: eager, full coordinates
    calls.clear()

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, ids, mask):
            return self.enc(ids, mask, pruner=KeepAll(), hard=True).hidden

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(Whole(), (batch["input_ids"], batch["attention_mask"]), check_trace=False)
    assert calls == []  # a trace (fvcore's count, ONNX export) sees the eager ops


def test_hard_mode_scatters_nothing_back_for_cls_and_the_packed_views_are_exact(monkeypatch):
    from tokprune.core.encoder import PackedTokens

    bert = tiny_bert(seed=7, layers=4)
    batch = random_batch(batch=5, length=16, seed=7)
    enc = PrunableEncoder(bert).eval()
    pruner = ChecksPackedViews()
    full = run(enc, batch, pruner=pruner, hard=True)  # the checks read ctx.hidden: materialised on demand
    assert pruner.checked == 3
    soft = run(enc, batch, pruner=ChecksPackedViews(), hard=False)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(full.hidden[real], soft.hidden[real], atol=1e-4, rtol=0)
    assert torch.equal(full.kept_counts(), soft.kept_counts())
    assert (full.kept_counts()[-1] < full.lengths).all()

    class Quick(ChecksPackedViews):  # the same decisions from the packed views alone
        def forward(self, ctx):
            if ctx.layer == 0:
                return ctx.keep
            scores = ctx.received_attention().masked_fill(~ctx.live, 2.0)
            return (scores > scores.min(1, keepdim=True).values).to(ctx.keep.dtype)

    def refuse(*args, **kwargs):
        raise AssertionError("hard mode scattered states or probabilities back to full length")

    monkeypatch.setattr(PackedTokens, "full_hidden", refuse)
    monkeypatch.setattr(PackedTokens, "full_probs", refuse)
    cls = run(enc, batch, pruner=Quick(), hard=True, output="cls")
    torch.testing.assert_close(cls.hidden[:, 0], full.hidden[:, 0], atol=1e-6, rtol=0)
    assert torch.equal(cls.kept_counts(), full.kept_counts())


def test_a_pruner_that_does_not_decide_is_not_called_in_hard_mode():
    class Counting(KeepAll):
        calls = 0

        def forward(self, ctx):
            Counting.calls += 1
            return ctx.keep

    bert = tiny_bert(layers=3)
    batch = random_batch(batch=3, length=10)
    enc = PrunableEncoder(bert).eval()
    hard = run(enc, batch, pruner=Counting(), hard=True)
    assert Counting.calls == 0 and torch.equal(hard.kept_counts()[-1], hard.lengths.long())
    run(enc, batch, pruner=Counting(), hard=False)
    assert Counting.calls == 3  # soft mode (training) is unchanged


def test_the_classifier_reads_cls_only():
    from tokprune.config import compose
    from tokprune.core.data import get_task
    from tokprune.methods import build_method

    module = build_method(compose(["method=none", "model=tiny"]), tiny_bert(layers=2), get_task("sst2")).eval()
    logits, out = module(random_batch(batch=3, length=10), hard=True)
    assert out.hidden.shape[:2] == (3, 1) and logits.shape == (3, 2)
    assert out.kept_counts().shape == (2, 3)  # the FLOPs callback's input: per layer and example
