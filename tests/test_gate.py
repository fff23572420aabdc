"""method=gate: rank-indexed gates, clipped, sparsity + bi-modal terms, thresholded in hard mode."""

import pytest
import torch
from torch.utils.data import DataLoader

from tokprune.config import compose
from tokprune.core.data import get_task
from tokprune.core.encoder import PruneContext
from tokprune.methods import build_method
from tokprune.methods.gate import GatePruner, Method

from conftest import kept_after_steps, quiet_trainer, random_batch, tiny_bert

LAYERS = 3


def make(*overrides: str, seed: int = 0, method: str = "gate") -> Method:
    cfg = compose([f"method={method}", "model=tiny", "protocol=paper", *overrides])  # the paper's losses
    return build_method(cfg, tiny_bert(seed=seed, layers=LAYERS), get_task("sst2"))


def labelled_batch(seed: int = 0, batch: int = 8, length: int = 16) -> dict:
    data = random_batch(batch=batch, length=length, seed=seed)
    data["labels"] = torch.arange(batch) % 2
    return data


def set_gates(module: Method, values: torch.Tensor) -> None:
    with torch.no_grad():
        module.pruner.weights.copy_(values.expand_as(module.pruner.weights))


def test_gates_start_at_one_and_the_model_equals_the_baseline():
    gate, none = make(), make(method="none")
    gate.load_state_dict(none.state_dict(), strict=False)  # same backbone and head
    assert torch.all(gate.pruner.gates() == 1)
    batch = labelled_batch()
    gate.eval(), none.eval()
    with torch.no_grad():
        for hard in (False, True):
            logits, out = gate(batch, hard=hard)
            expected, _ = none(batch, hard=hard)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
            assert torch.equal(out.kept_counts()[-1], out.lengths.long())


def test_gates_have_their_own_lr_and_no_weight_decay():
    module = make("method.gate_lr=0.02")
    (group,) = [g for g in module.parameter_groups() if any(p is module.pruner.weights for p in g["params"])]
    assert group["lr"] == 0.02 and group["weight_decay"] == 0.0 and len(group["params"]) == 1


def test_clipping_after_every_step_keeps_gates_in_0_1():
    module = make("method.gate_lr=0.5", "method.lambda_sparse=10.0", "train.lr=1e-9")
    loader = DataLoader([labelled_batch(seed=i) for i in range(6)], batch_size=None)
    trainer = quiet_trainer(max_steps=6)
    trainer.fit(module, train_dataloaders=loader)
    gates = module.pruner.gates()
    assert gates.min() >= 0 and gates.max() <= 1
    assert (gates == 0).any()  # the sparsity push hit the floor and stayed there


def test_bimodal_term_lowers_the_share_of_undecided_gates():
    module = make(
        "method.lambda_sparse=0", "method.lambda_bimodal=1.0", "method.bimodal_start=0", "method.bimodal_ramp=0"
    )
    g = torch.Generator().manual_seed(0)
    set_gates(module, torch.rand(module.pruner.weights.shape, generator=g) * 0.6 + 0.2)
    undecided_before = 1 - module.bimodal_share()
    optimizer = torch.optim.Adam([module.pruner.weights], lr=0.05)
    batch = labelled_batch()
    for _ in range(40):
        loss = module.losses(torch.zeros(8, 2), None, batch)["bimodal_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_optimizer_step()
    assert undecided_before == 1.0 and 1 - module.bimodal_share() < 0.2


def test_bimodal_weight_is_zero_until_its_start_then_ramps():
    module = make("method.bimodal_start=0.5", "method.bimodal_ramp=0.25")
    for progress, expected in [(0.0, 0.0), (0.49, 0.0), (0.625, 0.5), (0.75, 1.0), (1.0, 1.0)]:
        type(module).progress = property(lambda self, p=progress: p)
        try:
            assert module.bimodal_ramp() == pytest.approx(expected)
        finally:
            del type(module).progress


def test_sparsity_term_weights_later_layers_more():
    module = make("method.lambda_sparse=1.0")
    assert module.layer_weights().tolist() == pytest.approx([2 / 3, 3 / 3])  # gated layers 1 and 2 of 3
    terms = module.losses(torch.zeros(8, 2), None, labelled_batch())
    assert float(terms["sparsity_loss"]) == pytest.approx(2 / 3 + 1)  # all gates 1


def kept_after_training(lambda_sparse: float, seed: int, steps: int = 30) -> float:
    module = make(f"method.lambda_sparse={lambda_sparse}", "method.gate_lr=0.05", seed=seed)
    return kept_after_steps(module, labelled_batch(seed=seed), steps, lr=1e-3, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_larger_lambda_sparse_prunes_more(seed):
    assert kept_after_training(5.0, seed) < kept_after_training(0.0, seed) - 0.2


def test_ranking_uses_the_previous_layers_attention_and_pins_cls():
    received = torch.tensor([[0.0, 0.1, 0.5, 0.3, 0.1, 0.0]])  # attention each key receives
    probs = received[:, None, None, :].expand(1, 2, 6, 6).clone()
    keep = torch.tensor([[1.0, 1, 1, 1, 0, 0]])  # token 4 dropped earlier, token 5 padding
    padding = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    ranks = PruneContext(1, torch.zeros(1, 6, 4), keep, probs, padding).importance_ranks()
    assert ranks[0, 0] == 0  # [CLS] first although it receives nothing
    assert ranks[0, :4].tolist() == [0, 3, 1, 2]  # then by received attention
    assert sorted(ranks[0, 4:].tolist()) == [4, 5]  # dropped and padding last


def test_one_gate_vector_serves_examples_of_different_lengths():
    module = make().eval()
    gates = torch.zeros(module.pruner.weights.shape[1])
    gates[:3] = 1  # ranks 0, 1, 2 kept: [CLS] and the two most attended tokens, whatever the length
    set_gates(module, gates)
    batch = labelled_batch(batch=4, length=16)
    with torch.no_grad():
        _, out = module(batch)
    assert out.lengths.unique().numel() > 1
    assert torch.all(out.kept_counts()[1:] == 3)


def test_soft_evaluation_with_thresholded_gates_equals_hard_mode():
    module = make().eval()
    g = torch.Generator().manual_seed(1)
    set_gates(module, torch.rand(module.pruner.weights.shape, generator=g))
    batch = labelled_batch(batch=6, length=16)
    with torch.no_grad():
        soft_logits, soft = module(batch, hard=False)
        hard_logits, hard = module(batch, hard=True)
    torch.testing.assert_close(hard_logits, soft_logits, atol=1e-4, rtol=0)
    assert torch.equal(hard_logits.argmax(-1), soft_logits.argmax(-1))
    assert torch.equal(soft.kept_counts(), hard.kept_counts())
    assert (hard.kept_counts()[-1] < hard.lengths).any()  # something was pruned
    assert torch.all(hard.kept_counts()[1:] <= hard.kept_counts()[:-1])  # never grows with depth


def test_bins_map_ranks_by_length():
    pruner = GatePruner(
        3,
        slots=4,
        first_gated_layer=1,
        ranks="bins",
        parametrisation="clipped",
        sigmoid_init=3.0,
        threshold=0.5,
        inference="threshold",
    )
    ranks = torch.arange(8).expand(2, 8)
    live = torch.tensor([8, 4])
    slots = pruner.slots_of(ranks, live)
    assert slots[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # floor(r / 8 * 4)
    assert slots[1, :4].tolist() == [0, 1, 2, 3]  # floor(r / 4 * 4); ranks past the live ones clamp


def test_top_sum_keeps_floor_of_the_gate_sum():
    module = make("method.inference=top_sum").eval()
    set_gates(module, torch.full((module.pruner.weights.shape[1],), 4.5 / module.pruner.weights.shape[1]))
    batch = labelled_batch(batch=4, length=16)
    with torch.no_grad():
        _, out = module(batch)
    assert torch.all(out.kept_counts()[1:] == 4)  # floor(4.5) ranks


def test_sigmoid_parametrisation_starts_below_one_but_keeps_everything():
    module = make("method.parametrisation=sigmoid").eval()
    assert torch.all(module.pruner.gates() < 1) and torch.all(module.pruner.gates() > 0.5)
    batch = labelled_batch()
    with torch.no_grad():
        _, out = module(batch)
    assert torch.equal(out.kept_counts()[-1], out.lengths.long())


def test_the_gate_table_artifact_has_one_row_per_gated_layer():
    table = make().state_tables()["gates.tsv"].splitlines()
    assert len(table) == 1 + LAYERS - 1 and table[1].split("\t")[0] == "1"


def test_straight_through_trains_on_the_thresholded_gates_with_their_gradient():
    module = make("method.straight_through=true")
    g = torch.Generator().manual_seed(2)
    set_gates(module, torch.rand(module.pruner.weights.shape, generator=g))
    batch = labelled_batch(batch=6, length=16)
    module.train()
    for m in module.modules():  # training forward without dropout, to compare with evaluation
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    logits, out = module(batch)  # training forward: binary masks
    assert all(torch.equal(k, (k > 0.5).float()) for k in out.keep)
    module.eval()
    with torch.no_grad():
        hard_logits, hard = module(batch)
    torch.testing.assert_close(logits.detach(), hard_logits, atol=1e-4, rtol=0)
    assert torch.equal(out.kept_counts(), hard.kept_counts())
    logits.sum().backward()
    assert module.pruner.weights.grad.abs().sum() > 0


def test_inference_expected_keeps_the_sum_of_gate_values_and_training_computes_what_hard_mode_does():
    module = make("method.straight_through=true", "method.inference=expected")
    gates = torch.rand(module.pruner.weights.shape, generator=torch.Generator().manual_seed(3))
    set_gates(module, gates)
    batch = labelled_batch()
    for dropout in (m for m in module.modules() if isinstance(m, torch.nn.Dropout)):
        dropout.p = 0.0  # the training forward without its noise
    module.train()
    soft_logits, soft = module(batch)
    expected = module.expected_kept(soft)
    torch.testing.assert_close(expected, soft.kept_counts().to(expected.dtype), atol=0.5, rtol=0)  # round(sum g)
    module.eval()
    with torch.no_grad():
        hard_logits, hard = module(batch, hard=True)
    assert torch.equal(hard.kept_counts(), soft.kept_counts())  # the same tokens in training and in hard mode
    torch.testing.assert_close(hard_logits, soft_logits.detach(), atol=1e-4, rtol=0)
