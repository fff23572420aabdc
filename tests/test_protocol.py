"""protocol=shared: every learned method starts from the fine-tuned baseline, distils it (from
outputs cached per training row), and holds one expected-FLOPs target; protocol=paper keeps each
paper's recipe. Unit tests on tiny random-weight models."""

import re
from types import SimpleNamespace

import datasets
import pytest
import torch

from tokprune.config import compose
from tokprune.core.backbone import load_tokenizer
from tokprune.core.data import ROW, get_task
from tokprune.errors import UsageError
from tokprune.methods import build_method
from tokprune.methods.checkpoint import FrozenReference, describe
from tokprune.methods.distill import prediction_distillation
from tokprune.methods.protocol import TeacherOutputs

from conftest import random_batch, tiny_bert, train_steps

LAYERS = 4
LEARNED = ("gate", "transkimmer", "top")
OWN = {"gate": "pruner.weights", "transkimmer": "pruner.predictors", "top": "pruner.token_log_alpha"}
METHOD_SETTINGS = {
    "gate": ["method.straight_through=true", "method.gate_lr=5e-2", "method.inference=expected"],
    "transkimmer": ["method.predictor_lr=1e-2"],
    "top": ["method.reg_lr=0.1"],
    "static": [],
}


def make(method: str, *overrides: str, seed: int = 0):
    cfg = compose([f"method={method}", "model=tiny", *overrides])
    return build_method(cfg, tiny_bert(seed=seed, layers=LAYERS), get_task("sst2"))


def baseline_checkpoint(tmp_path, seed: int = 3) -> str:
    """A tokprune checkpoint of a tiny unpruned model, as train() writes one."""
    cfg = compose(["method=none", "model=tiny"])
    model = build_method(cfg, tiny_bert(seed=seed, layers=LAYERS), get_task("sst2"))
    with torch.no_grad():
        model.classifier.bias.fill_(0.25)  # a head that differs from a fresh one's
    path = tmp_path / "baseline.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "tokprune": describe(cfg, model.encoder.config, load_tokenizer(cfg.model), None),
        },
        path,
    )
    return str(path)


def labelled_batch(seed: int = 0, batch: int = 6, length: int = 16) -> dict:
    data = random_batch(batch=batch, length=length, seed=seed)
    data["labels"] = torch.arange(batch) % 2
    return data


def training_rows(batches: list[dict]) -> SimpleNamespace:
    """What prepare_fit reads of a datamodule: a tokenised training set with row ids, a collate."""
    rows = []
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            rows.append(
                {
                    "input_ids": ids[:n].tolist(),
                    "token_type_ids": [0] * n,
                    "attention_mask": [1] * n,
                    "labels": int(labels),
                }
            )
    dataset = datasets.Dataset.from_list(rows).add_column(ROW, list(range(len(rows)))).with_format("torch")

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            out[key] = torch.stack([torch.nn.functional.pad(f[key], (0, width - len(f[key]))) for f in features])
        out["labels"] = torch.stack([f["labels"] for f in features])
        out[ROW] = torch.stack([f[ROW] for f in features])
        return out

    return SimpleNamespace(splits={"train": dataset}, collate=collate, eval_batch_size=4, max_length=16)


# -- the start ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*LEARNED, "static"])
def test_shared_starts_from_the_baselines_weights_and_keeps_the_methods_own_init(method, tmp_path):
    path = baseline_checkpoint(tmp_path)
    module = make(method, f"protocol.baseline_checkpoint={path}", "protocol.teacher_cache=false")
    fresh = {k: v.clone() for k, v in module.state_dict().items()}
    module.prepare_fit()
    baseline = torch.load(path, weights_only=True)["state_dict"]
    for name, value in baseline.items():  # encoder and head: the baseline's
        torch.testing.assert_close(module.state_dict()[name], value)
    own = [k for k in fresh if k.startswith("pruner.") or k == "multipliers"]
    assert all(torch.equal(module.state_dict()[k], fresh[k]) for k in own)  # the method's own: untouched
    if method in OWN:
        assert any(k.startswith(OWN[method]) for k in own)
    assert module.teacher is not None  # and the baseline is the teacher


def test_shared_without_a_baseline_is_a_usage_error_and_paper_starts_pretrained(tmp_path):
    with pytest.raises(UsageError, match=r"protocol.baseline_checkpoint=<best.ckpt of a method=none run>"):
        make("gate").prepare_fit()
    module = make("gate", "protocol=paper")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.prepare_fit()  # the paper's start: the weights as built, no teacher
    assert module.teacher is None and all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# -- distillation from cached teacher outputs -------------------------------------------------


@pytest.mark.parametrize("method", [*LEARNED, "static"])
def test_the_distillation_term_reads_cached_teacher_outputs_equal_to_a_live_forward(method, tmp_path):
    path = baseline_checkpoint(tmp_path)
    batches = [labelled_batch(seed=s) for s in range(2)]
    data = training_rows(batches)
    module = make(method, f"protocol.baseline_checkpoint={path}", "protocol.distill_weight=0.4")
    module.prepare_fit(data)
    assert module.teacher.cache is not None and len(list(tmp_path.glob("teacher-outputs-*.pt"))) == 1
    batch = next(
        iter(torch.utils.data.DataLoader(data.splits["train"], batch_size=5, shuffle=True, collate_fn=data.collate))
    )
    cached, live = module.teacher(batch), module.teacher.live(batch)
    torch.testing.assert_close(cached.logits, live.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.importance, live.importance, atol=1e-5, rtol=1e-5)
    module.train()
    logits, out = module(batch)
    terms = module.losses(logits, out, batch)
    assert "distill_loss" in terms
    if method != "top":  # the shared blend; ToP keeps its own loss (KD alone, temperature 2)
        expected = 0.4 * prediction_distillation(logits, live.logits, 2.0, regression=False)
        torch.testing.assert_close(terms["distill_loss"], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(terms["task_loss"], 0.6 * module.task_loss(logits, batch["labels"]))
    again = make(method, f"protocol.baseline_checkpoint={path}")
    again.prepare_fit(data)  # the second run reads the file back
    torch.testing.assert_close(again.teacher.cache["logits"], module.teacher.cache["logits"])


# -- one FLOPs model, one target --------------------------------------------------------------


@pytest.mark.parametrize("method", [*LEARNED, "static"])
def test_the_expected_flops_ratio_equals_the_measured_one_for_binary_decisions(method):
    settings = {"gate": "method.straight_through=true", "top": "method.bins=2"}
    module = make(method, settings.get(method, "protocol.target_flops=0.5"), "protocol.target_flops=0.5")
    batch = labelled_batch()
    if method == "gate":  # thresholded gates: a binary forward
        with torch.no_grad():
            module.pruner.weights.copy_(
                torch.rand(module.pruner.weights.shape, generator=torch.Generator().manual_seed(1)).round()
            )  # 0 or 1
    if method == "transkimmer":  # predictors without their keep bias: some tokens skimmed
        with torch.no_grad():
            for predictor in module.pruner.predictors:
                predictor.net[4].bias.zero_()
    if method == "top":  # masks decided: bins on or off, layer gates on
        with torch.no_grad():
            module.pruner.token_log_alpha.copy_(torch.tensor([100.0, -100.0]))  # the more important half
            module.pruner.layer_log_alpha.fill_(100.0)
    module.train()
    torch.manual_seed(0)
    _, out = module(batch)
    measured = module.flops_model().batch(out, 16).ratio_real
    expected = float(module.expected_flops_ratio(out))
    if method == "top":  # its expected kept length (n - 1) / 2 + 1 against ceil((n - 1) / 2) + 1 kept
        assert expected == pytest.approx(measured, abs=0.03)
    else:
        assert expected == pytest.approx(measured, rel=1e-6)
        assert measured < 1.0


@pytest.mark.parametrize("method", LEARNED)
def test_a_short_run_holds_the_expected_flops_ratio_near_the_target(method):
    module = make(
        method,
        "protocol=shared",
        "protocol.target_flops=0.6",
        "protocol.target_warmup=0",
        "protocol.distill_weight=0",
        *METHOD_SETTINGS[method],
        seed=1,
    )
    module.teacher = TeacherOutputs(FrozenReference(make("none", seed=2), path=None))  # ToP distils always
    batch = labelled_batch(batch=8, length=16)
    ratios = []
    train_steps(
        module,
        batch,
        150,
        lr=1e-3,
        seed=0,
        after_step=lambda out: ratios.append(float(module.expected_flops_ratio(out))),
    )
    assert ratios[0] > 0.9  # every method starts unpruned
    assert sum(ratios[-20:]) / 20 == pytest.approx(0.6, abs=0.08)
    module.eval()
    with torch.no_grad():
        _, out = module(batch)
    assert module.flops_model().batch(out, 16).ratio_real == pytest.approx(0.6, abs=0.12)


def test_static_picks_the_schedule_that_meets_the_target_on_the_training_rows(tmp_path):
    path = baseline_checkpoint(tmp_path)
    batches = [labelled_batch(seed=s, length=16) for s in range(3)]
    module = make("static", f"protocol.baseline_checkpoint={path}", "protocol.target_flops=0.55")
    module.prepare_fit(training_rows(batches))
    assert module.trains and module.cfg.method.keep_last < 1.0  # fine-tuned, under the chosen schedule
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches])
    ratio = module.flops_ratio(module.cfg.method.keep_last, lengths)
    assert ratio <= 0.55 < module.flops_ratio(module.cfg.method.keep_last + 1e-3, lengths)
    assert module.pruner.fractions[LAYERS - 1] == pytest.approx(module.cfg.method.keep_last)
    assert not make("static", "protocol=paper").trains  # the paper's: one evaluation


def test_selection_reads_the_shared_target_for_every_learned_method():
    for method in LEARNED:
        module = make(method, "protocol.target_flops=0.4", "protocol.selection_epsilon=0.02")
        assert module.selection_rule == "best_meeting_constraint"
        assert module.meets_constraint({"val/flops_ratio_real": 0.419})
        assert not module.meets_constraint({"val/flops_ratio_real": 0.43})
    assert make("gate", "protocol=paper").selection_rule == "last"
    assert make("none").selection_rule == "best_metric"


# -- protocol=paper: the papers' losses --------------------------------------------------------


def test_paper_keeps_each_papers_loss_terms():
    batch = labelled_batch()
    expected = {
        "gate": {"task_loss", "sparsity_loss", "bimodal_loss"},
        "transkimmer": {"task_loss", "skim_loss"},
        "static": {"task_loss"},
    }
    for method, terms in expected.items():
        module = make(method, "protocol=paper")
        logits, out = module(batch)
        assert set(module.losses(logits, out, batch)) == terms
    shared = {
        "gate": {"task_loss", "bimodal_loss", "flops_constraint"},
        "transkimmer": {"task_loss", "flops_constraint"},
    }
    for method, terms in shared.items():
        module = make(method, "protocol.distill_weight=0")
        logits, out = module(batch)
        assert set(module.losses(logits, out, batch)) == terms
    top = make("top", "protocol=paper", "method.target_sparsity=0.3")
    assert top.flops_target.ratio == pytest.approx(0.7)  # ToP's own target, 1 - target_sparsity


@pytest.mark.parametrize(
    "override, message",
    [
        ("protocol.target_flops=0", "bad value for protocol.target_flops: 0.0 (expected a number in (0, 1])"),
        ("protocol.target_flops=1.5", "bad value for protocol.target_flops: 1.5 (expected a number in (0, 1])"),
        ("protocol=fair", "unknown protocol 'fair': choose from paper, shared"),
        (
            "protocol.constraint=exact",
            "bad value for protocol.constraint: 'exact' (expected one of lagrangian, quadratic)",
        ),
    ],
)
def test_bad_protocol_values_are_one_line_errors(override, message):
    with pytest.raises(UsageError) as error:
        compose(["method=gate", override])
    assert str(error.value) == message


@pytest.mark.parametrize("method", LEARNED)
def test_in_the_hard_phase_training_computes_what_inference_does_and_decisions_stay(method, monkeypatch):
    bins = ["method.bins=2"] if method == "top" else []
    module = make(method, "protocol.hard_phase=0.2", *bins, *METHOD_SETTINGS[method], seed=1)
    module.teacher = TeacherOutputs(FrozenReference(make("none", seed=2), path=None))
    for layer in module.modules():  # dropout off: train- and eval-mode forwards comparable
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    with torch.no_grad():  # decisions that remove tokens
        if method == "gate":
            module.pruner.weights.copy_(
                torch.linspace(1.0, 0.0, module.pruner.weights.shape[1]).expand_as(module.pruner.weights)
            )
        if method == "top":  # the more important half of the tokens, every layer gate on
            module.pruner.token_log_alpha.copy_(torch.tensor([100.0, -100.0]))
            module.pruner.layer_log_alpha.fill_(100.0)
        if method == "transkimmer":  # predictors without their keep bias: some tokens skimmed
            for predictor in module.pruner.predictors:
                predictor.net[4].bias.zero_()
    batch = labelled_batch(batch=8, length=16)
    monkeypatch.setattr(type(module), "progress", property(lambda self: 0.5))
    assert not module.decisions_frozen()
    module.train()
    assert "flops_constraint" in module.losses(*module(batch), batch)
    monkeypatch.setattr(type(module), "progress", property(lambda self: 0.85))  # the last 0.2 of training
    assert module.decisions_frozen()
    module.train()
    logits, out = module(batch)
    assert module.pruner.training  # left as it was found
    module.eval()
    with torch.no_grad():
        inference, removed = module(batch)  # hard mode: tokens removed
    assert removed.hard and not out.hard
    assert torch.allclose(logits, inference, atol=1e-5)
    assert [k.sum(1).tolist() for k in out.keep] == [k.sum(1).tolist() for k in removed.keep]
    assert removed.keep[-1].sum() < removed.padding.sum()  # something was removed
    module.train()
    terms = module.losses(logits, out, batch)
    assert "flops_constraint" not in terms and not {"bimodal_loss", "skim_loss"} & set(terms)
    sum(terms.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in module.pruner.parameters())  # decisions: not trained
    assert module.multipliers.grad is None
    assert module.classifier.weight.grad.abs().sum() > 0  # the weights are


def test_the_hard_phase_is_off_by_default_and_never_for_static_or_paper():
    assert compose([]).protocol.hard_phase == 0.0
    for module in (make("static", "protocol.hard_phase=0.5"), make("top", "protocol=paper", "protocol.hard_phase=0.5")):
        assert not module.decisions_frozen()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["protocol.hard_phase=1"], "bad value for protocol.hard_phase: 1"),
        (["protocol.hard_phase=0.8", "protocol.target_warmup=0.3"], "freeze before the FLOPs target has ramped in"),
        (["protocol.hard_phase=0.2", "train.devices=2"], "use train.strategy=ddp_find_unused_parameters_true"),
    ],
)
def test_a_hard_phase_that_cannot_work_is_a_one_line_error(overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        compose(["method=top", *overrides])
