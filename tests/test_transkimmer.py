"""method=transkimmer: keep-biased predictors, straight-through masks, the skim loss, eval argmax; the
hard-equivalent training rule, skim targets, warm-up, per-layer credit and logit distillation."""

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tokprune.config import compose
from tokprune.core.backbone import load_tokenizer
from tokprune.core.data import get_task
from tokprune.core.encoder import EncoderOutput
from tokprune.errors import UsageError
from tokprune.methods import build_method
from tokprune.methods.checkpoint import FrozenReference, describe
from tokprune.methods.distill import logit_distillation
from tokprune.methods.protocol import TeacherOutputs
from tokprune.methods.transkimmer import DEFAULTS, KEEP, SKIM, Method, gumbel_noise, straight_through

from conftest import kept_after_steps, quiet_trainer, random_batch, tiny_bert

LAYERS = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_method(*overrides: str, seed: int = 0, layers: int = LAYERS) -> Method:
    cfg = compose(["method=transkimmer", "model=tiny", "protocol=paper", *overrides])  # the paper's losses
    return build_method(cfg, tiny_bert(seed=seed, layers=layers), get_task("sst2"))


def labelled_batch(seed: int = 0, batch: int = 4, length: int = 12) -> dict:
    data = random_batch(batch=batch, length=length, seed=seed)
    data["labels"] = torch.arange(batch) % 2
    return data


def decide(predictor, skim: bool) -> None:
    """Make a predictor propose skim (or keep) for every token, whatever its input."""
    last = predictor.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias[KEEP], last.bias[SKIM] = (-5.0, 5.0) if skim else (5.0, -5.0)


def test_the_method_builds_from_the_config():
    module = make_method("method.skim_lambda=0.1", "method.first_skim_layer=1")
    assert isinstance(module, Method) and module.soft_rule == "renormalised"  # the hard-equivalent rule by default
    assert make_method("method.train_attention=reference").soft_rule == "post_softmax"
    assert len(module.pruner.predictors) == LAYERS - 1  # none before layer 0
    defaults = compose(["method=transkimmer"]).method
    assert (defaults.skim_lambda, defaults.tau, defaults.first_skim_layer, defaults.init_checkpoint) == (
        0.5,
        1.0,
        0,
        None,
    )
    # the new options are off (or as before) by default
    assert (
        defaults.skim_target,
        defaults.skim_warmup,
        defaults.skim_layer_weights,
        defaults.skim_loss_on,
        defaults.skim_norm,
        defaults.teacher_checkpoint,
    ) == (None, 0.0, None, "cumulative", "real", None)
    assert not hasattr(module, "multipliers") and module.layer_weights == [1 / LAYERS] * LAYERS
    assert {key: defaults[key] for key in DEFAULTS} == DEFAULTS  # what older checkpoints' configs read as
    for predictor in module.pruner.predictors:
        decide(predictor, skim=True)
    batch = labelled_batch()
    _, out = module(batch)
    padding = batch["attention_mask"].float()
    assert torch.equal(out.keep[0], padding)  # layer 0 has no predictor: everything computed
    kept_fraction = torch.stack([k.sum(1) for k in out.keep]).div(padding.sum(1)).mean()
    torch.testing.assert_close(module.losses(torch.zeros(4, 2), out, batch)["skim_loss"], 0.1 * kept_fraction)


def test_a_checkpoint_config_without_the_new_keys_builds_as_before():
    cfg = compose(["method=transkimmer", "model=tiny", "method.skim_lambda=0.1"])
    for key in DEFAULTS:
        del cfg.method[key]
    del cfg["protocol"]  # written before protocols: the paper's recipe
    module = build_method(cfg, tiny_bert(), get_task("sst2"))
    assert module.option("skim_loss_on") == "cumulative" and not hasattr(module, "multipliers")
    batch = labelled_batch()
    _, out = module(batch)
    kept_fraction = torch.stack([k.sum(1) for k in out.keep]).div(out.lengths).mean()
    assert set(module.losses(torch.zeros(4, 2), out, batch)) == {"task_loss", "skim_loss"}
    torch.testing.assert_close(module.losses(torch.zeros(4, 2), out, batch)["skim_loss"], 0.1 * kept_fraction)


def test_first_skim_layer_out_of_range_is_a_usage_error():
    with pytest.raises(UsageError, match="first_skim_layer"):
        make_method(f"method.first_skim_layer={LAYERS}")


def test_predictors_start_by_keeping_every_token():
    module = make_method()
    assert len(module.pruner.predictors) == LAYERS  # the reference skims before layer 0 too
    hidden = torch.randn(4, 12, module.encoder.config.hidden_size) * 3
    for predictor in module.pruner.predictors:
        last = predictor.net[-1]
        bias = last.bias.detach()
        assert abs(float(bias[KEEP]) - 5.0) < 0.1 and abs(float(bias[SKIM]) + 5.0) < 0.1
        assert 0.01 < float(last.weight.detach().std()) < 0.03
        keep_probability = predictor(hidden).softmax(-1)[..., KEEP]
        assert float(keep_probability.min()) > 0.999
    torch.manual_seed(0)
    _, out = module.train()(labelled_batch())
    assert all(torch.equal(keep, out.padding) for keep in out.keep)  # Gumbel samples keep all at init


def test_task_loss_reaches_the_predictors_through_the_straight_through_masks():
    module = make_method().train()
    batch = labelled_batch()
    torch.manual_seed(0)
    logits, out = module(batch)
    assert all(set(keep.unique().tolist()) <= {0.0, 1.0} for keep in out.keep)  # hard samples forward
    module.task_loss(logits, batch["labels"]).backward()  # no skim loss: only the task can reach them
    for predictor in module.pruner.predictors:
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert float(predictor.net[-1].weight.grad.abs().sum()) > 0
    module.zero_grad(set_to_none=True)
    logits, _ = module.eval()(batch)  # argmax masks: no gradient path, by design
    module.task_loss(logits, batch["labels"]).backward()
    assert all(p.grad is None for p in module.pruner.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_cls_is_never_skimmed_and_masks_are_cumulative(training):
    module = make_method().train(training)
    decide(module.pruner.predictors[1], skim=True)  # layer 1 asks to skim everything, [CLS] too
    decide(module.pruner.predictors[2], skim=False)  # layer 2 asks to keep everything again
    batch = labelled_batch()
    _, out = module(batch)
    assert out.hard is not training
    cls_only = torch.zeros_like(out.padding)
    cls_only[:, 0] = 1
    assert torch.equal(out.keep[0], out.padding)
    assert torch.equal(out.keep[1], cls_only) and torch.equal(out.keep[2], cls_only)


def test_evaluation_is_deterministic_while_training_samples():
    module = make_method()
    for predictor in module.pruner.predictors:  # undecided predictors: p(keep) near 1/2
        with torch.no_grad():
            predictor.net[-1].bias.zero_()
    batch = labelled_batch(batch=6, length=16)
    module.eval()
    with torch.no_grad():
        (logits_a, out_a), (logits_b, out_b) = module(batch), module(batch)
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(out_a.keep, out_b.keep))
    assert float(out_a.kept_fraction()[-1]) < 1  # something was skimmed, so the check has teeth
    module.train()
    torch.manual_seed(1)
    _, sample_a = module(batch)
    torch.manual_seed(2)
    _, sample_b = module(batch)
    assert not all(torch.equal(a, b) for a, b in zip(sample_a.keep, sample_b.keep))


def test_skim_loss_divides_by_the_real_length_not_the_padded_one():
    module = make_method("method.skim_lambda=2.0", layers=2)
    padding = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    keep_l0 = padding.clone()
    keep_l1 = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    out = EncoderOutput(torch.zeros(2, 8, 4), [keep_l0, keep_l1], [None, None], padding)
    # layer 0 keeps 4/4 and 8/8, layer 1 keeps 2/4 and 4/8: mean kept fraction (1 + 0.5) / 2
    torch.testing.assert_close(
        module.losses(torch.zeros(2, 2), out, {"labels": torch.zeros(2, dtype=torch.long)})["skim_loss"],
        torch.tensor(2.0 * 0.75),
    )


def kept_after_training(skim_lambda: float, seed: int, steps: int = 40) -> float:
    """Eval-mode kept fraction after a few AdamW steps on one batch (same data, init and noise)."""
    module = make_method(f"method.skim_lambda={skim_lambda}", seed=seed)
    return kept_after_steps(module, labelled_batch(seed=seed, batch=8, length=16), steps, lr=1e-2, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_larger_skim_lambda_keeps_fewer_tokens(seed):
    without_skim_loss = kept_after_training(0.0, seed)
    with_skim_loss = kept_after_training(1.0, seed)
    assert without_skim_loss > 0.9  # the task alone barely moves the keep-biased predictors
    assert with_skim_loss < without_skim_loss - 0.4


def baseline_checkpoint(tmp_path) -> tuple[str, dict]:
    """A real Lightning checkpoint of a `method=none` run on the tiny model (one step)."""
    cfg = compose(["method=none", "model=tiny", "train.max_steps=1"])
    baseline = build_method(cfg, tiny_bert(seed=7), get_task("sst2"))
    batches = DataLoader([labelled_batch()], batch_size=None)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(baseline, train_dataloaders=batches)
    path = tmp_path / "baseline.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return str(path), {k: v.clone() for k, v in baseline.state_dict().items()}


def test_init_checkpoint_loads_the_baseline_but_keeps_the_predictor_init(tmp_path):
    path, weights = baseline_checkpoint(tmp_path)
    module = make_method(f"method.init_checkpoint={path}", seed=0)
    module.prepare_fit()
    state = module.state_dict()
    for name, value in weights.items():
        assert torch.equal(state[name], value), name
    fresh = make_method(seed=0)  # same seeds: predictors as initialised, untouched by the load
    for name, value in fresh.pruner.state_dict().items():
        assert torch.equal(module.pruner.state_dict()[name], value), name


def test_init_checkpoint_that_does_not_fit_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        make_method(f"method.init_checkpoint={tmp_path / 'missing.ckpt'}").prepare_fit()
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"classifier.weight": torch.zeros(2, 32)}}, path)
    with pytest.raises(UsageError, match="lacks"):
        make_method(f"method.init_checkpoint={path}").prepare_fit()


def test_predictor_lr_gives_the_predictors_their_own_learning_rate():
    assert all("lr" not in group for group in make_method().parameter_groups())  # default: train.lr
    module = make_method("method.predictor_lr=1e-3")
    groups = module.parameter_groups()
    predictor_ids = {id(p) for p in module.pruner.parameters()}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters())  # each parameter once
    for group in groups:
        own = {id(p) in predictor_ids for p in group["params"]}
        assert own == {True} and group["lr"] == 1e-3 or own == {False} and "lr" not in group


# -- train what is evaluated -------------------------------------------------------------------


def undecided(module: Method) -> Method:
    """Predictors whose argmax decisions vary from token to token (keep logits near the skim ones)."""
    for predictor in module.pruner.predictors:
        with torch.no_grad():
            predictor.net[-1].bias.zero_()
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_the_default_training_rule_on_argmax_masks_equals_hard_mode_and_the_reference_rule_does_not(seed):
    batch = labelled_batch(seed=seed, batch=6, length=16)
    results = {}
    for rule in ("renormalised", "reference"):
        module = undecided(make_method(f"method.train_attention={rule}", seed=seed)).eval()  # argmax decisions
        with torch.no_grad():
            module.classifier.weight.normal_(0.0, 1.0)  # logits of order 1, not 0.01, so differences show
            (soft_logits, soft), (hard_logits, hard) = module(batch, hard=False), module(batch, hard=True)
        assert not soft.hard and hard.hard
        assert torch.equal(soft.kept_counts(), hard.kept_counts())  # the same decisions in both modes
        assert 0 < float(hard.kept_fraction()[-1]) < 0.9  # tokens were skimmed: the check has teeth
        results[rule] = (float((soft_logits - hard_logits).abs().max()), float((soft.hidden - hard.hidden).abs().max()))
    assert results["renormalised"][0] < 1e-4 and results["renormalised"][1] < 1e-5
    # the paper's rule trains a model that hard mode does not compute
    assert results["reference"][0] > 1e-3 and results["reference"][1] > 1e-2


def test_argmax_training_decisions_are_evaluations_and_still_carry_the_softmax_gradient():
    """``train_decisions=argmax``: the training forward keeps exactly the tokens evaluation keeps
    (sampled decisions do not), and the loss still reaches every predictor (straight-through)."""
    batch = labelled_batch(batch=6, length=16)
    counts = {}
    for decisions in ("argmax", "sampled"):
        module = undecided(make_method(f"method.train_decisions={decisions}")).eval()
        with torch.no_grad():
            _, evaluated = module(batch, hard=True)
        module.pruner.train()  # the training branch of the decisions; no dropout in the backbone
        torch.manual_seed(0)
        logits, trained = module(batch, hard=False)
        counts[decisions] = (trained.kept_counts(), evaluated.kept_counts())
        if decisions == "argmax":
            logits.sum().backward()
            assert all(p.net[-1].weight.grad.abs().sum() > 0 for p in module.pruner.predictors)
    assert 0 < float(evaluated.kept_fraction()[-1]) < 0.9  # tokens were skimmed: the check has teeth
    assert torch.equal(*counts["argmax"])
    assert not torch.equal(*counts["sampled"])


# -- the skim term: normalisation, layer weights, warm-up --------------------------------------


def hand_output() -> tuple[EncoderOutput, dict]:
    padding = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    keep_l1 = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    out = EncoderOutput(torch.zeros(2, 8, 4), [padding.clone(), keep_l1], [None, None], padding)
    return out, {"labels": torch.zeros(2, dtype=torch.long)}


def test_skim_norm_padded_is_the_references_formula_on_a_padded_batch():
    out, labels = hand_output()
    module = make_method("method.skim_lambda=2.0", "method.skim_norm=padded", layers=2)
    # lambda * (1/L) sum_l mean_b(sum_j m_lj) / N: layer 0 keeps 4 and 8 of N = 8, layer 1 2 and 4
    by_hand = 2.0 * ((4 / 8 + 8 / 8) / 2 + (2 / 8 + 4 / 8) / 2) / 2
    torch.testing.assert_close(module.losses(torch.zeros(2, 2), out, labels)["skim_loss"], torch.tensor(by_hand))
    real = make_method("method.skim_lambda=2.0", layers=2).losses(torch.zeros(2, 2), out, labels)["skim_loss"]
    torch.testing.assert_close(real, torch.tensor(2.0 * 0.75))  # ours: (4/4 + 8/8)/2 and (2/4 + 4/8)/2


def test_skim_layer_weights_are_normalised_and_checked():
    out, labels = hand_output()
    module = make_method("method.skim_lambda=2.0", "method.skim_layer_weights=[1,3]", layers=2)
    assert module.layer_weights == [0.25, 0.75]
    # per layer (real length): 1.0 and 0.5
    torch.testing.assert_close(
        module.losses(torch.zeros(2, 2), out, labels)["skim_loss"], torch.tensor(2.0 * (0.25 * 1.0 + 0.75 * 0.5))
    )
    with pytest.raises(UsageError, match="skim_layer_weights must be 3"):
        make_method("method.skim_layer_weights=[1,1]")
    with pytest.raises(UsageError, match="skim_layer_weights"):
        compose(["method=transkimmer", "model=tiny", "method.skim_layer_weights=[0,0,0]"])


def at_progress(monkeypatch, progress: float) -> None:
    monkeypatch.setattr(Method, "progress", property(lambda self: progress))


def test_skim_warmup_ramps_the_weight_from_zero_and_the_target_from_one(monkeypatch):
    out, labels = hand_output()
    linear = make_method("method.skim_lambda=2.0", "method.skim_warmup=0.5", layers=2)
    target = make_method(
        "method.skim_target=0.4",
        "method.skim_warmup=0.5",
        "method.skim_target_mode=quadratic",
        "method.skim_lambda=2.0",
        layers=2,
    )
    kept = 0.75  # the hand output's kept fraction
    for progress, ramp in [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (1.0, 1.0)]:
        at_progress(monkeypatch, progress)
        skim = linear.losses(torch.zeros(2, 2), out, labels)["skim_loss"]
        assert float(skim) == pytest.approx(2.0 * ramp * kept)  # exactly 0 at the first step
        assert target.target() == pytest.approx(1 - ramp * 0.6)
        assert float(target.losses(torch.zeros(2, 2), out, labels)["skim_loss"]) == pytest.approx(
            2.0 * (kept - (1 - ramp * 0.6)) ** 2
        )
    at_progress(monkeypatch, 0.3)
    assert make_method("method.skim_lambda=2.0", layers=2).ramp() == 1.0  # no warm-up: full weight from step 0


# -- per-layer credit: cumulative or own -------------------------------------------------------


def skim_gradients(*overrides: str) -> tuple[list[float], list[Tensor], list[Tensor]]:
    """|grad| of each predictor's parameters from the skim term alone (one training forward),
    with the skim term's masks and the encoder's."""
    module = undecided(make_method(*overrides)).train()
    batch = labelled_batch(batch=6, length=16)
    torch.manual_seed(0)
    logits, out = module(batch)
    masks = [m.detach() for m in module.layer_masks(out)] if "method.skim_loss_on=own" in overrides else None
    module.losses(logits, out, batch)["skim_loss"].backward()
    grads = [
        sum(float(p.grad.abs().sum()) for p in predictor.parameters() if p.grad is not None)
        for predictor in module.pruner.predictors
    ]
    return grads, masks, [k.detach() for k in out.keep]


def test_own_skim_loss_reaches_only_the_weighted_layers_predictor():
    cumulative, _, _ = skim_gradients("method.skim_layer_weights=[0,0,1]")
    assert all(g > 0 for g in cumulative)  # the last layer's cumulative mask depends on every predictor
    own, masks, keeps = skim_gradients("method.skim_layer_weights=[0,0,1]", "method.skim_loss_on=own")
    assert own[0] == 0 and own[1] == 0 and own[2] > 0
    assert all(torch.equal(m, k) for m, k in zip(masks, keeps))  # same values as the effective masks
    uniform, _, _ = skim_gradients("method.skim_loss_on=own")
    assert all(g > 0 for g in uniform)
    first, _, _ = skim_gradients("method.skim_layer_weights=[1,0,0]", "method.skim_loss_on=own")
    assert first[0] > 0 and first[1] == 0 and first[2] == 0


def test_own_decisions_are_the_encoders_decisions():
    """The recorded own proposal (detached input, same Gumbel noise) is the sample the encoder used."""
    module = undecided(make_method("method.skim_loss_on=own")).train()
    batch = labelled_batch(batch=6, length=16)
    torch.manual_seed(3)
    _, out = module(batch)
    own = module.pruner.own_proposals
    assert sorted(own) == list(range(LAYERS))
    for layer, keep in enumerate(out.keep):
        alive = out.keep[layer - 1] if layer else out.padding
        assert torch.equal(keep[:, 1:], own[layer][:, 1:] * alive[:, 1:])
    module.losses(torch.zeros(6, 2), out, batch)
    assert module.pruner.own_proposals == {}  # used by the loss, not kept on the module
    with torch.no_grad():
        module.eval()(batch)
    assert module.pruner.own_proposals == {}  # nothing recorded outside training


def test_the_sampler_is_torchs_gumbel_softmax():
    logits = torch.randn(3, 5, 2, requires_grad=True)
    torch.manual_seed(0)
    ours = straight_through(logits + gumbel_noise(logits), 0.7)
    torch.manual_seed(0)
    torchs = F.gumbel_softmax(logits, tau=0.7, hard=True)
    assert torch.equal(ours, torchs)
    weights = torch.randn(2)
    grads = [torch.autograd.grad((y * weights).sum(), logits)[0] for y in (ours, torchs)]
    assert torch.equal(*grads)


# -- a target kept fraction ---------------------------------------------------------------------


def train_predictors_to_target(mode: str, target: float, steps: int = 200, seed: int = 0) -> list[float]:
    """Only the predictors (and multipliers) learn, on one batch, from the skim term alone, with the
    target ramping over half the steps; returns the training kept fraction of every step."""
    module = make_method(
        f"method.skim_target={target}",
        f"method.skim_target_mode={mode}",
        "method.skim_lambda=1.0",
        "method.target_lr=0.02",
        "method.skim_warmup=0.5",
        seed=seed,
    )
    batch = labelled_batch(seed=seed, batch=8, length=16)
    groups = [{"params": list(module.pruner.parameters()), "lr": 3e-3}]
    groups += [g for g in module.own_parameter_groups() if g.get("constant_lr")]  # the multipliers, if any
    optimizer = torch.optim.AdamW(groups)
    step = [0]
    type(module).progress = property(lambda self: step[0] / steps)
    kept = []
    try:
        torch.manual_seed(seed)
        module.train()
        for step[0] in range(steps):
            logits, out = module(batch)
            skim = module.losses(logits, out, batch)["skim_loss"]
            kept.append(float(module.kept_fraction(out).detach()))
            optimizer.zero_grad()
            skim.backward()
            optimizer.step()
    finally:
        del type(module).progress
    return kept


@pytest.mark.parametrize("mode", ["lagrangian", "quadratic"])
def test_a_target_holds_the_kept_fraction(mode):
    kept = train_predictors_to_target(mode, 0.4)
    assert kept[0] == pytest.approx(1.0)  # keep-biased init
    assert abs(sum(kept[-20:]) / 20 - 0.4) < 0.05


def test_lagrangian_multipliers_ascend_with_their_own_constant_lr():
    module = make_method("method.skim_target=0.5", "method.target_lr=0.1", "method.predictor_lr=1e-3")
    groups = module.own_parameter_groups()
    assert groups[-1] == {"params": [module.multipliers], "lr": 0.1, "weight_decay": 0.0, "constant_lr": True}
    assert not hasattr(make_method("method.skim_target=0.5", "method.skim_target_mode=quadratic"), "multipliers")
    out, labels = hand_output()  # kept 0.75 over 2 layers: above the target
    module = make_method("method.skim_target=0.5", "method.target_lr=0.1", layers=2)
    optimizer = torch.optim.AdamW(module.own_parameter_groups())
    penalties = []
    for _ in range(5):
        skim = module.losses(torch.zeros(2, 2), out, labels)["skim_loss"]
        penalties.append(float(skim))
        optimizer.zero_grad()
        skim.backward()
        optimizer.step()
    assert penalties[0] == 0.0 and all(b > a for a, b in zip(penalties, penalties[1:]))  # it grows while missed
    assert all(float(v) > 0 for v in module.multipliers)


# -- distillation from the fine-tuned baseline ---------------------------------------------------


def attach_teacher(module: Method, seed: int = 5) -> None:
    teacher = build_method(
        compose(["method=none", "model=tiny", f"task={module.task.name}"]),
        tiny_bert(seed=seed, layers=module.encoder.num_layers),
        module.task,
    )
    module.teacher = TeacherOutputs(FrozenReference(teacher, path=None))


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_distillation_replaces_that_share_of_the_task_loss_and_the_teacher_stays_frozen(weight):
    module = make_method(
        "method.teacher_checkpoint=in-memory", f"method.distill_weight={weight}", "method.temperature=2.0"
    ).train()
    attach_teacher(module)
    teacher = module.teacher.teacher.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = labelled_batch()
    logits, out = module(batch)
    terms = module.losses(logits, out, batch)
    with torch.no_grad():
        teacher_logits, _ = teacher(batch, hard=False)
    torch.testing.assert_close(terms["task_loss"], (1 - weight) * module.task_loss(logits, batch["labels"]))
    torch.testing.assert_close(terms["distill_loss"], weight * logit_distillation(logits, teacher_logits, 2.0))
    sum(terms.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not any(k.startswith("teacher") for k in module.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert module.classifier.weight.grad is not None


def test_without_a_teacher_checkpoint_there_is_no_distillation():
    module = make_method("method.distill_weight=1.0")
    batch = labelled_batch()
    logits, out = module(batch)
    terms = module.losses(logits, out, batch)
    assert set(terms) == {"task_loss", "skim_loss"}
    torch.testing.assert_close(terms["task_loss"], module.task_loss(logits, batch["labels"]))
    with pytest.raises(RuntimeError, match="prepare_fit"):
        make_method("method.teacher_checkpoint=some.ckpt").losses(logits, out, batch)


def test_regression_distils_the_teachers_prediction():
    cfg = compose(
        [
            "method=transkimmer",
            "model=tiny",
            "task=stsb",
            "protocol=paper",
            "method.teacher_checkpoint=x",
            "method.distill_weight=0.5",
        ]
    )
    module = build_method(cfg, tiny_bert(), get_task("stsb"))
    attach_teacher(module)
    batch = labelled_batch()
    batch["labels"] = torch.rand(4) * 5
    logits, out = module(batch)
    terms = module.losses(logits, out, batch)
    with torch.no_grad():
        teacher_logits, _ = module.teacher.teacher(batch, hard=False)
    torch.testing.assert_close(terms["distill_loss"], 0.5 * F.mse_loss(logits.squeeze(-1), teacher_logits.squeeze(-1)))


def tokprune_checkpoint(tmp_path, method: str = "none", seed: int = 3) -> str:
    """A tokprune checkpoint of a tiny model, written as train() writes one."""
    cfg = compose([f"method={method}", "model=tiny"])
    model = build_method(cfg, tiny_bert(seed=seed, layers=LAYERS), get_task("sst2"))
    path = tmp_path / f"{method}.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "tokprune": describe(cfg, model.encoder.config, load_tokenizer(cfg.model), None),
        },
        path,
    )
    return str(path)


def test_a_fit_with_every_option_loads_a_frozen_teacher_and_moves_the_multipliers(tmp_path):
    with pytest.raises(UsageError, match="must be unpruned"):
        make_method(f"method.teacher_checkpoint={tokprune_checkpoint(tmp_path, 'transkimmer')}").prepare_fit()
    path = tokprune_checkpoint(tmp_path)
    module = make_method(
        f"method.teacher_checkpoint={path}",
        f"method.init_checkpoint={path}",
        "method.skim_target=0.5",
        "method.skim_warmup=0.5",
        "method.skim_loss_on=own",
        "method.skim_layer_weights=[0,1,1]",
        "method.skim_norm=padded",
        "method.predictor_lr=1e-3",
        "method.target_lr=0.05",
        "train.lr=1e-3",
    )
    module.prepare_fit()
    teacher = module.teacher.teacher.module
    for name, value in teacher.state_dict().items():  # init_checkpoint: the same file, so the same weights
        torch.testing.assert_close(module.state_dict()[name], value)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader([labelled_batch(seed=i) for i in range(4)], batch_size=None)
    trainer = quiet_trainer(max_steps=4, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=loader)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    after = module.state_dict()
    assert not torch.equal(after["multipliers"], before["multipliers"])
    assert not torch.equal(after["pruner.predictors.2.net.4.bias"], before["pruner.predictors.2.net.4.bias"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.skim_target=0", "method.skim_target: 0"),
        ("method.skim_target=1.5", "method.skim_target: 1.5"),
        ("method.skim_target_mode=pid", "method.skim_target_mode: 'pid'"),
        ("method.skim_loss_on=layer", "method.skim_loss_on: 'layer'"),
        ("method.skim_norm=max", "method.skim_norm: 'max'"),
        ("method.train_decisions=noisy", "method.train_decisions: 'noisy'"),
        ("method.skim_warmup=2", "method.skim_warmup: 2"),
        ("method.distill_weight=1.5", "method.distill_weight: 1.5"),
        ("method.target_lr=0", "method.target_lr: 0"),
    ],
)
def test_bad_option_values_are_refused_when_the_config_is_composed(override, message):
    with pytest.raises(UsageError, match=f"bad value for {message}"):
        compose(["method=transkimmer", "model=tiny", override])
