"""method=top: hard-concrete masks, rank bins, the FLOPs Lagrangian, ranking and logit distillation,
the teacher, and hard-mode equivalence."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

from tokprune.config import compose
from tokprune.core.backbone import load_tokenizer
from tokprune.core.data import get_task
from tokprune.core.encoder import PruneContext
from tokprune.errors import UsageError
from tokprune.methods import build_method
from tokprune.methods.checkpoint import FrozenReference, describe
from tokprune.methods.protocol import TeacherOutputs
from tokprune.methods.top import (
    LOG_ALPHA_RANGE,
    TEMPERATURE,
    Method,
    TopPruner,
    deterministic_mask,
    log_alpha_for,
    logit_distillation,
    prob_nonzero,
    rank_distillation_loss,
    sample_hard_concrete,
)

from conftest import quiet_trainer, random_batch, tiny_bert

LAYERS = 4  # prunable layers 2 and 3 by default; distilled layer 1


def make(*overrides: str, seed: int = 0, layers: int = LAYERS, task: str = "sst2") -> Method:
    cfg = compose(["method=top", "model=tiny", f"task={task}", "protocol=paper", *overrides])  # the paper's losses
    return build_method(cfg, tiny_bert(seed=seed, layers=layers), get_task(task))


def labelled_batch(seed: int = 0, batch: int = 6, length: int = 16) -> dict:
    data = random_batch(batch=batch, length=length, seed=seed)
    data["labels"] = torch.arange(batch) % 2
    return data


def set_log_alpha(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype).expand_as(param))


def attach_teacher(module: Method, seed: int = 1) -> None:
    """An in-memory unpruned teacher of the same shape (no checkpoint file needed)."""
    teacher = build_method(
        compose(["method=none", "model=tiny", f"task={module.task.name}"]),
        tiny_bert(seed=seed, layers=module.encoder.num_layers),
        module.task,
    )
    module.teacher = TeacherOutputs(FrozenReference(teacher, path=None))


# -- hard-concrete masks --------------------------------------------------------------------


def test_hard_concrete_samples_lie_in_0_1_and_match_p_nonzero():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-2.0, 0.0, 1.5]).repeat_interleave(20000)
    z = sample_hard_concrete(log_alpha).view(3, -1)
    assert z.min() >= 0 and z.max() <= 1
    assert ((z == 0).float().mean() > 0.05) and ((z == 1).float().mean() > 0.05)  # the stretch puts mass on 0 and 1
    expected = 1 - torch.sigmoid(TEMPERATURE * math.log(0.1 / 1.1) - torch.tensor([-2.0, 0.0, 1.5]))
    torch.testing.assert_close(prob_nonzero(torch.tensor([-2.0, 0.0, 1.5])), expected)
    torch.testing.assert_close((z > 0).float().mean(1), expected, atol=0.01, rtol=0)
    assert prob_nonzero(torch.tensor([-100.0, 100.0])).tolist() == pytest.approx([1e-6, 1 - 1e-6])
    assert float(prob_nonzero(torch.tensor(log_alpha_for(0.3)))) == pytest.approx(0.3)


def test_masks_start_unpruned_and_are_clamped_after_each_step():
    module = make()
    pruner = module.pruner
    assert pruner.token_log_alpha.shape == (2, 25) and pruner.layers == [2, 3]  # SST-2: 25 bins
    assert abs(pruner.token_log_alpha.mean() - 10) < 0.01 and abs(pruner.layer_log_alpha.mean() + 10) < 0.02
    module.after_optimizer_step()
    low, high = LOG_ALPHA_RANGE
    assert torch.allclose(pruner.token_log_alpha, torch.full_like(pruner.token_log_alpha, high))
    assert torch.allclose(pruner.layer_log_alpha, torch.full_like(pruner.layer_log_alpha, low))
    module.eval()
    batch = labelled_batch()
    with torch.no_grad():
        _, out = module(batch)
    assert torch.equal(out.kept_counts()[-1], out.lengths.long())  # layer gates off: nothing pruned


def test_deterministic_masks_zero_the_expected_number_of_the_smallest_entries():
    log_alpha = torch.tensor([4.0, -4.0, 4.2, -4.1, 3.9, -0.5, 4.0, -3.9])  # P ~ 0.996 x4, 0.75, 0.08 x3
    mask = deterministic_mask(log_alpha)
    zeros = round(8 - float(prob_nonzero(log_alpha).sum()))
    assert zeros == 3 and int((mask == 0).sum()) == zeros
    assert set(torch.nonzero(mask == 0).flatten().tolist()) == {1, 3, 7}  # the three smallest; P = 0.75 stays on
    assert set(mask.tolist()) <= {0.0, 1.0}
    pruner = TopPruner(4, [2, 3], bins=8, eval_masks="reference")
    set_log_alpha(pruner.layer_log_alpha, [log_alpha_for(0.51), log_alpha_for(0.49)])
    assert pruner.deterministic()[1].tolist() == [1.0, 0.0]  # a layer gate is on iff P(z>0) >= 0.5


def test_expected_masks_keep_each_layers_expected_share_of_bins_the_reference_rounds_apart():
    half = [log_alpha_for(0.95)] * 4 + [log_alpha_for(0.05)] * 4  # mean P 0.5
    expected, reference = TopPruner(4, [2, 3], bins=8), TopPruner(4, [2, 3], bins=8, eval_masks="reference")
    for pruner in (expected, reference):
        set_log_alpha(pruner.token_log_alpha, [half, half])
        set_log_alpha(pruner.layer_log_alpha, [log_alpha_for(0.6), log_alpha_for(0.4)])
    tokens, gates = expected.deterministic()
    # kept share 1 - 0.5 * 0.6 = 0.7 -> 6 of 8 bins; 1 - 0.5 * 0.4 = 0.8 -> 6 (6.4) of 8
    assert tokens.sum(1).tolist() == [6.0, 6.0] and gates.tolist() == [1.0, 1.0]
    assert tokens[:, :4].sum() == 8  # every high-P bin kept; ties among the rest: the lower (more important) bins
    assert tokens[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    tokens, gates = reference.deterministic()  # the gate rounded alone: 0.5 of the bins, or none pruned
    assert gates.tolist() == [1.0, 0.0] and tokens.sum(1).tolist() == [4.0, 4.0]
    set_log_alpha(expected.layer_log_alpha, [log_alpha_for(0.05)] * 2)  # 1 - 0.5 * 0.05 rounds to every bin
    assert expected.deterministic()[1].tolist() == [0.0, 0.0]


def measured_and_expected_sparsity(eval_masks: str, seed: int) -> tuple[float, float]:
    """(measured hard-mode sparsity, expected sparsity) of MiniLM-sized ToP masks left undecided
    (bins at random P, layer gates at P 0.3..0.9) on a random padded batch."""
    module = minilm_sized_method("method.bins=25", f"method.eval_masks={eval_masks}").eval()
    g = torch.Generator().manual_seed(seed)
    layers = len(module.pruner.layers)
    token_p = torch.rand(layers, 25, generator=g) * 0.9 + 0.05
    layer_p = torch.rand(layers, generator=g) * 0.6 + 0.3
    set_log_alpha(module.pruner.token_log_alpha, [[log_alpha_for(float(p)) for p in row] for row in token_p])
    set_log_alpha(module.pruner.layer_log_alpha, [log_alpha_for(float(p)) for p in layer_p])
    batch = random_batch(batch=32, length=64, vocab=50, seed=seed)
    with torch.no_grad():
        _, out = module(batch, hard=True)
    measured = 1 - module.flops_model().batch(out, 64).ratio_real
    return float(measured), 1 - float(module.expected_flops_ratio(out).detach())


def test_measured_sparsity_of_the_evaluation_masks_lands_within_005_of_the_expected():
    misses = {"expected": [], "reference": []}
    for seed in range(3):
        for rule, found in misses.items():
            measured, expected = measured_and_expected_sparsity(rule, seed)
            assert 0.2 < expected < 0.9
            found.append(abs(measured - expected))
    assert max(misses["expected"]) < 0.05
    assert max(misses["reference"]) > 0.05  # the reference's rounding misses on the same masks


# -- ranking into bins -----------------------------------------------------------------------


def ranking_context(layer: int = 1) -> PruneContext:
    received = torch.tensor([[0.9, 0.3, 0.1, 0.2, 0.15, 0.12, 0.08, 0.0]])  # [CLS] gets most, excluded anyway
    probs = received[:, None, None, :].expand(1, 2, 8, 8).clone()
    keep = torch.tensor([[1.0, 1, 1, 1, 1, 0, 1, 0]])  # token 5 dropped earlier, token 7 padding
    padding = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 0]])
    return PruneContext(layer, torch.zeros(1, 8, 4), keep, probs, padding)


def test_ranks_map_to_bins_by_live_length_dead_tokens_last_cls_excluded():
    ctx = ranking_context()
    # live tokens 1, 3, 4, 2, 6 by importance: ranks 0, 3, 1, 2, -, 4, - of 5 live tokens
    assert TopPruner(3, [1], bins=5).bins_of(ctx)[0].tolist() == [0, 3, 1, 2, 5, 4, 5]
    assert TopPruner(3, [1], bins=2).bins_of(ctx)[0].tolist() == [0, 1, 0, 0, 2, 1, 2]  # floor(r * 2 / 5)


def test_deterministic_keep_drops_the_zeroed_bins_of_a_pruning_layer():
    pruner = TopPruner(3, [1], bins=2).eval()
    set_log_alpha(pruner.token_log_alpha, [[4.6, -4.6]])  # bin 1 off
    set_log_alpha(pruner.layer_log_alpha, [4.6])  # the layer prunes
    keep = pruner(ranking_context())
    assert keep[0].tolist() == [1, 1, 0, 1, 1, 0, 0, 0]
    set_log_alpha(pruner.layer_log_alpha, [-4.6])  # gate off: the layer keeps every live token
    assert pruner(ranking_context())[0].tolist() == [1, 1, 1, 1, 1, 0, 1, 0]


# -- the constraint --------------------------------------------------------------------------


def minilm_sized_method(*overrides: str) -> Method:
    """Random weights with all-MiniLM-L6-v2's sizes: hidden 384, 12 heads (of 32), FFN 1536, 6 layers."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    cfg = compose(["method=top", "model=tiny", "method.bins=4", *overrides])
    return build_method(cfg, BertModel(config), get_task("sst2"))


def hand_sparsity(lengths, ratios, hidden, heads, ffn, next_ffn=False):
    head = hidden // heads

    def attention(n):
        return heads * (3 * n * hidden * head + 2 * n * n * head + n * n) + n * hidden * hidden

    total = 0.0
    for n in lengths:
        kept = [(n - 1) * r + 1 for r in ratios]
        ffn_at = kept[1:] + kept[-1:] if next_ffn else kept
        pruned = sum(attention(k) for k in kept) + sum(2 * k * hidden * ffn for k in ffn_at)
        full = len(ratios) * (attention(n) + 2 * n * hidden * ffn)
        total += pruned / full
    return 1 - total / len(lengths)


def test_expected_sparsity_is_the_shared_flops_model_at_the_references_expected_lengths():
    module = minilm_sized_method()
    assert module.pruner.layers == [2, 3, 4, 5]
    token_p = [[0.6] * 4, [0.2, 0.8, 0.2, 0.8], [0.9] * 4, [0.5] * 4]
    layer_p = [0.5, 0.9, 0.25, 0.7]
    set_log_alpha(module.pruner.token_log_alpha, [[log_alpha_for(p) for p in row] for row in token_p])
    set_log_alpha(module.pruner.layer_log_alpha, [log_alpha_for(p) for p in layer_p])
    ratios, ratio = [1.0, 1.0], 1.0  # layers 0 and 1 compute every token
    for row, gate in zip(token_p, layer_p):
        ratio *= 1 - (1 - sum(row) / len(row)) * gate
        ratios.append(ratio)
    lengths = torch.tensor([12, 40, 64])
    out = SimpleNamespace(lengths=lengths)
    kept = (lengths[None, :] - 1) * torch.tensor(ratios)[:, None] + 1  # (n - 1) * ratio + 1, [CLS] always
    torch.testing.assert_close(module.expected_kept(out), kept)
    expected = module.expected_flops_ratio(out)
    assert float(expected) == pytest.approx(
        float(module.flops_model().expected_ratio(kept.double(), lengths)), rel=1e-5
    )
    # the reference's hand-written MACs with MiniLM's sizes agree to within fvcore's layer norms and biases
    assert 1 - float(expected) == pytest.approx(hand_sparsity(lengths.tolist(), ratios, 384, 12, 1536), abs=0.02)


def test_multipliers_ascend_so_the_penalty_grows_while_sparsity_is_below_target():
    module = make("method.target_sparsity=0.5", "method.target_warmup=0", "method.reg_lr=0.05")
    optimizer = torch.optim.AdamW([g for g in module.parameter_groups() if g.get("constant_lr")])
    out = SimpleNamespace(lengths=torch.tensor([16, 12, 9]))
    penalties, sparsities = [], []
    for _ in range(8):
        penalty = module.flops_constraint(out)
        s_hat, target = 1 - float(module.expected_flops_ratio(out)), 1 - module.flops_target.at(module.flops_ramp())
        assert target == pytest.approx(0.5) and s_hat < target
        penalties.append(float(penalty))
        sparsities.append(float(s_hat))
        optimizer.zero_grad()
        penalty.backward()
        optimizer.step()
        module.after_optimizer_step()
    lambda1, lambda2 = module.multipliers.tolist()
    assert lambda1 < 0 < lambda2  # below target: lambda1 * (s - t) and lambda2 * (s - t)^2 both grow
    assert all(b > a for a, b in zip(penalties[1:], penalties[2:])) and penalties[-1] > 0
    assert sparsities[-1] > sparsities[1]  # and the masks move towards the target
    assert module.pruner.layer_log_alpha.min() >= LOG_ALPHA_RANGE[0] - 1e-6


def test_target_ramps_and_the_ranking_weight_decays_with_the_warmup():
    module = make("method.target_sparsity=0.6", "method.target_warmup=0.5", "method.distill_alpha=0.1")
    for progress, target, weight in [(0.0, 0.0, 0.1), (0.25, 0.3, 0.05), (0.5, 0.6, 0.001), (1.0, 0.6, 0.001)]:
        type(module).progress = property(lambda self, p=progress: p)
        try:
            ramped = 1 - module.flops_target.at(module.flops_ramp())
            assert ramped == pytest.approx(target) and module.rank_weight() == pytest.approx(weight)
        finally:
            del type(module).progress


def test_mask_and_multiplier_groups_have_a_constant_reg_lr_and_no_weight_decay():
    module = make("method.reg_lr=0.03")
    groups = [g for g in module.parameter_groups() if g.get("constant_lr")]
    assert len(groups) == 2 and all(g["lr"] == 0.03 and g["weight_decay"] == 0.0 for g in groups)
    owned = {id(p) for g in groups for p in g["params"]}
    assert owned == {id(module.pruner.token_log_alpha), id(module.pruner.layer_log_alpha), id(module.multipliers)}


# -- distillation losses ---------------------------------------------------------------------


def test_rank_loss_matches_lambdaloss_arp2_on_the_teachers_top_k():
    teacher = torch.tensor([[0.9, 0.5, 0.4, 0.3, 0.2, 0.1]])
    padding = torch.ones(1, 6)
    student = torch.tensor([[0.0, 0.2, 0.7, 0.1, 0.3, 0.4]])
    s1, s2, s3 = 0.2, 0.7, 0.1  # top 3 of the teacher: tokens 1, 2, 3 with relevance 3, 2, 1

    def term(d):
        return math.log2(1 + math.exp(-d))

    expected = (1 * term(s1 - s2) + 2 * term(s1 - s3) + 1 * term(s2 - s3)) / 9
    assert float(rank_distillation_loss(student, teacher, padding, topk=3)) == pytest.approx(expected, rel=1e-6)
    ordered = rank_distillation_loss(teacher * 1000, teacher, padding, topk=3)
    reversed_ = rank_distillation_loss(-teacher * 1000, teacher, padding, topk=3)
    assert float(ordered) < 1e-6 and float(reversed_) > 1.0
    assert rank_distillation_loss(teacher, teacher, padding, 3) < rank_distillation_loss(-teacher, teacher, padding, 3)


def test_rank_loss_ignores_cls_padding_and_tokens_outside_the_top_k():
    teacher = torch.tensor([[0.9, 0.5, 0.4, 0.3, 0.2, 0.0, 0.0], [0.9, 0.1, 0.6, 0.0, 0.0, 0.0, 0.0]])
    padding = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0], [1.0, 1, 1, 0, 0, 0, 0]])
    student = torch.rand(2, 7, generator=torch.Generator().manual_seed(0))
    base = rank_distillation_loss(student, teacher, padding, topk=3)
    changed = student.clone()
    changed[:, 0] = 5.0  # [CLS]
    changed[0, 4] = -3.0  # outside example 0's top 3
    changed[0, 5:] = 7.0  # padding
    changed[1, 3:] = 7.0
    torch.testing.assert_close(rank_distillation_loss(changed, teacher, padding, topk=3), base)
    # example 1 has 2 real tokens but [CLS]: its list is those two, relevance 2, 1, divided by 2^2
    one = math.log2(1 + math.exp(-(float(student[1, 2]) - float(student[1, 1])))) / 4
    alone = rank_distillation_loss(student[1:], teacher[1:], padding[1:], topk=3)
    assert float(alone) == pytest.approx(one, rel=1e-6)


def test_rank_loss_gradient_orders_the_student_like_the_teacher():
    teacher = torch.tensor([[0.9, 0.5, 0.4, 0.3, 0.2, 0.1]])
    student = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]], requires_grad=True)
    rank_distillation_loss(student, teacher, torch.ones(1, 6), topk=5).backward()
    assert student.grad[0, 1] < 0 < student.grad[0, 5]  # descent raises the teacher's first, lowers its last
    assert student.grad[0, 0] == 0  # [CLS] is not ranked


def test_logit_distillation_is_kl_teacher_to_student_at_temperature_2():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0, 0.5], [1.0, -1.0, 0.0]])
    loss = logit_distillation(student, teacher, 2.0)
    p_t, p_s = F.softmax(teacher / 2, -1), F.softmax(student.detach() / 2, -1)
    by_hand = (p_t * (p_t.log() - p_s.log())).sum() / 2 * 4
    reverse = (p_s * (p_s.log() - p_t.log())).sum() / 2 * 4
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6) and abs(float(by_hand - reverse)) > 1e-3
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * (p_s - p_t) / 2)  # T * (p_s - p_t) / batch
    moved = F.softmax((student.detach() - 0.5 * student.grad) / 2, -1)
    assert (moved - p_t).abs().sum() < (p_s - p_t).abs().sum()  # a descent step pulls the student to the teacher


def test_losses_replace_the_task_loss_and_log_nothing_outside_a_trainer():
    module = make()
    attach_teacher(module)
    batch = labelled_batch()
    logits, out = module(batch)
    terms = module.losses(logits, out, batch)
    assert set(terms) == {"distill_loss", "rank_loss", "flops_constraint"}
    assert float(terms["rank_loss"]) > 0 and float(terms["flops_constraint"]) == 0.0  # multipliers start at 0
    sum(terms.values()).backward()
    assert module.encoder.layers[1].attention.self.query.weight.grad is not None  # the ranking reaches layer 1


@pytest.mark.parametrize("target, key", [("labels", "task_loss"), ("teacher", "distill_loss")])
def test_regression_trains_on_labels_by_default_or_the_teacher(target, key):
    module = make(f"method.regression_target={target}", task="stsb")
    attach_teacher(module)
    batch = labelled_batch()
    batch["labels"] = torch.rand(6) * 5
    logits, out = module(batch)
    terms = module.losses(logits, out, batch)
    assert key in terms
    expected = F.mse_loss(logits.squeeze(-1), batch["labels"]) if target == "labels" else None
    if expected is not None:
        torch.testing.assert_close(terms[key], expected)


# -- masks in the encoder ------------------------------------------------------------------


def test_cls_is_kept_masks_are_cumulative_and_soft_values_do_not_compound():
    module = make("method.bins=4")
    set_log_alpha(module.pruner.token_log_alpha, [[0.0, 0.5, -0.5, 0.0], [0.0] * 4])
    set_log_alpha(module.pruner.layer_log_alpha, [4.6, -10.0])  # layer 2 prunes, layer 3 (almost surely) not
    torch.manual_seed(0)
    batch = labelled_batch(length=20)
    _, out = module(batch)
    padding = batch["attention_mask"].float()
    for layer, keep in enumerate(out.keep):
        assert torch.all(keep[:, 0] == 1) and torch.all(keep[padding == 0] == 0)
        if layer:
            assert torch.all((keep > 0) <= (out.keep[layer - 1] > 0))
    soft = out.keep[2][:, 1:][(out.keep[2][:, 1:] > 0) & (out.keep[2][:, 1:] < 1)]
    assert soft.numel() > 0  # token masks stay continuous in training
    torch.testing.assert_close(out.keep[3], (out.keep[2] > 0).float())  # the next layer sees the binarised keep


def test_soft_evaluation_with_deterministic_masks_equals_hard_mode():
    module = make("method.bins=4").eval()
    set_log_alpha(module.pruner.token_log_alpha, [[4.6, -4.6, 4.6, -4.6], [4.6, 4.6, -4.6, 4.6]])
    set_log_alpha(module.pruner.layer_log_alpha, [4.6, 4.6])
    batch = labelled_batch(batch=6, length=16)
    with torch.no_grad():
        soft_logits, soft = module(batch, hard=False)
        hard_logits, hard = module(batch, hard=True)
    torch.testing.assert_close(hard_logits, soft_logits, atol=1e-4, rtol=0)
    assert torch.equal(soft.kept_counts(), hard.kept_counts())
    assert (hard.kept_counts()[-1] < hard.lengths).all()  # something was pruned in every example
    assert torch.all(hard.kept_counts()[1:] <= hard.kept_counts()[:-1])


# -- config, teacher, selection ----------------------------------------------------------------


def test_defaults_follow_the_reference_and_per_task_values_apply():
    assert Method.default_prunable_layers(6) == [2, 3, 4, 5]
    assert Method.default_prunable_layers(12) == list(range(2, 12))
    assert Method.default_prunable_layers(2) == [1]
    assert make(layers=6).distill_layers == [1]
    assert make(layers=12).distill_layers == [1, 2, 3]  # the reference's range(1, L // 3) on BERT-base
    cola = compose(["method=top", "task=cola"]).method
    assert (cola.bins, cola.distill_topk, cola.target_sparsity, cola.target_warmup) == (20, 10, 0.43, 0.5)
    module = make("method.prunable_layers=[1,3]", "method.distill_layers=[0,2]")
    assert module.pruner.layers == [1, 3] and module.distill_layers == [0, 2]
    with pytest.raises(UsageError, match="prunable_layers"):
        make("method.prunable_layers=[0,2]")


def test_a_missing_teacher_is_a_usage_error():
    with pytest.raises(UsageError, match=r"method.teacher_checkpoint=<best.ckpt of a method=none run>"):
        make().prepare_fit()
    with pytest.raises(UsageError, match="no such file"):
        make("method.teacher_checkpoint=/nonexistent/best.ckpt").prepare_fit()


def test_meets_constraint_reads_the_measured_flops_ratio():
    module = make("method.target_sparsity=0.5", "method.selection_epsilon=0.01")
    assert module.selection_rule == "best_meeting_constraint"
    assert module.meets_constraint({"val/flops_ratio_real": 0.505})
    assert not module.meets_constraint({"val/flops_ratio_real": 0.52})
    assert not module.meets_constraint({"val/accuracy": 0.9})


def test_state_table_lists_every_prunable_layer():
    rows = make().state_tables()["top_masks.tsv"].splitlines()
    assert rows[0].startswith("layer\tgate_prob\tgate_on\tbins_kept")
    assert [r.split("\t")[0] for r in rows[1:]] == ["2", "3"]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A tokprune checkpoint of an unpruned (method=none) tiny model, written as train() writes one."""
    cfg = compose(["method=none", "model=tiny"])
    teacher = build_method(cfg, tiny_bert(seed=3, layers=LAYERS), get_task("sst2"))
    path = tmp_path_factory.mktemp("teacher") / "best.ckpt"
    torch.save(
        {
            "state_dict": teacher.state_dict(),
            "tokprune": describe(cfg, teacher.encoder.config, load_tokenizer(cfg.model), None),
        },
        path,
    )
    return path


def test_a_pruned_teacher_is_refused(tmp_path):
    cfg = compose(["method=top", "model=tiny"])
    pruned = build_method(cfg, tiny_bert(seed=3, layers=LAYERS), get_task("sst2"))
    path = tmp_path / "best.ckpt"
    torch.save(
        {
            "state_dict": pruned.state_dict(),
            "tokprune": describe(cfg, pruned.encoder.config, load_tokenizer(cfg.model), None),
        },
        path,
    )
    with pytest.raises(UsageError, match="must be unpruned"):
        make(f"method.teacher_checkpoint={path}").prepare_fit()


def test_the_teacher_stays_frozen_and_the_student_starts_from_it(teacher_checkpoint):
    module = make(f"method.teacher_checkpoint={teacher_checkpoint}", "method.reg_lr=0.05", "train.lr=1e-3")
    module.prepare_fit()
    teacher = module.teacher.teacher.module
    for name, value in teacher.state_dict().items():  # the student starts from the teacher's weights
        torch.testing.assert_close(module.state_dict()[name], value)
    assert not any(k.startswith("teacher") for k in module.state_dict())
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and all("embeddings" in n for n in frozen)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loader = DataLoader([labelled_batch(seed=i) for i in range(4)], batch_size=None)
    trainer = quiet_trainer(max_steps=4, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=loader)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not teacher.training
    after = module.state_dict()
    for name in after:
        if "embeddings" in name:
            assert torch.equal(after[name], before[name]), name
    weight = "encoder.layers.2.output.dense.weight"
    assert not torch.equal(after[weight], before[weight])
    assert not torch.equal(after["multipliers"], before["multipliers"])
    assert module.pruner.token_log_alpha.max() <= LOG_ALPHA_RANGE[1] + 1e-6


@pytest.mark.slow
def test_the_mission_command_sweeps_top_on_the_qqp_sample_end_to_end(glue_dir, tmp_path):
    """`make sweep METHOD=top TASK=qqp`, at the smoke budget on the tiny model: the baseline is
    trained once and is every trial's teacher, and the report lands in <report.dir>/qqp/."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokprune",
            "sweep",
            "method=top",
            "task=qqp",
            "budget=smoke",
            "model=tiny",
            "sweep.trials=2",
            f"mlflow.tracking_uri={uri}",
            f"train.checkpoint_dir={tmp_path / 'ckpt'}",
            f"report.dir={tmp_path / 'reports'}",
            "report.speedup_examples=4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        env={**os.environ, "GLUE_DIR": glue_dir},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "reports" / "qqp" / "report.html").is_file()
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    baseline = [r for r in runs if r.data.tags.get("role") == "baseline"]
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(baseline) == 1 and len(trials) == 2
    # protocol=shared: the baseline is every trial's start and teacher
    assert {t.data.params["protocol.baseline_checkpoint"] for t in trials} == {baseline[0].data.tags["checkpoint"]}
