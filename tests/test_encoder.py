"""The prunable encoder: equal to the backbone when nothing is pruned; hard == soft."""

import pytest
import torch

from tokprune.encoder import EncoderOutput, KeepAll, PrunableEncoder, Pruner, received_attention

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
    for keep, ps, ph in zip(hard.keep, soft.attentions, hard.attentions):
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
    from tokprune.backbone import load_bert, load_tokenizer
    from tokprune.config import compose
    from tokprune.data import get_task, read_glue_tsv
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
    out.hidden[:, 0].sum().backward()  # [CLS]'s final state: reaches token 4 only through attention
    grad = soft.grad[:, 4]
    assert torch.isfinite(grad).all() and (grad.abs() > 0).all()
