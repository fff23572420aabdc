"""method=transkimmer: keep-biased predictors, straight-through masks, the skim loss, eval argmax."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tokprune.config import compose
from tokprune.data import get_task
from tokprune.encoder import EncoderOutput
from tokprune.errors import UsageError
from tokprune.methods import build_method
from tokprune.methods.transkimmer import KEEP, SKIM, Method

from conftest import random_batch, tiny_bert

LAYERS = 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_method(*overrides: str, seed: int = 0, layers: int = LAYERS) -> Method:
    cfg = compose(["method=transkimmer", "model=tiny", *overrides])
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
    assert isinstance(module, Method) and module.soft_rule == "post_softmax"
    assert len(module.pruner.predictors) == LAYERS - 1  # none before layer 0
    defaults = compose(["method=transkimmer"]).method
    assert (defaults.skim_lambda, defaults.tau, defaults.first_skim_layer, defaults.init_checkpoint) == (0.5, 1.0, 0, None)
    for predictor in module.pruner.predictors:
        decide(predictor, skim=True)
    batch = labelled_batch()
    _, out = module(batch)
    padding = batch["attention_mask"].float()
    assert torch.equal(out.keep[0], padding)  # layer 0 has no predictor: everything computed
    kept_fraction = torch.stack([k.sum(1) for k in out.keep]).div(padding.sum(1)).mean()
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
    module = make_method("method.skim_lambda=2.0")
    padding = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    keep_l0 = padding.clone()
    keep_l1 = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    out = EncoderOutput(torch.zeros(2, 8, 4), [keep_l0, keep_l1], [None, None], padding)
    # layer 0 keeps 4/4 and 8/8, layer 1 keeps 2/4 and 4/8: mean kept fraction (1 + 0.5) / 2
    torch.testing.assert_close(module.losses(torch.zeros(2, 2), out, {"labels": torch.zeros(2, dtype=torch.long)})["skim_loss"], torch.tensor(2.0 * 0.75))


def kept_after_training(skim_lambda: float, seed: int, steps: int = 40) -> float:
    """Eval-mode kept fraction after a few AdamW steps on one batch (same data, init and noise)."""
    module = make_method(f"method.skim_lambda={skim_lambda}", seed=seed)
    batch = labelled_batch(seed=seed, batch=8, length=16)
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=1e-2)
    torch.manual_seed(seed)
    module.train()
    for _ in range(steps):
        logits, out = module(batch)
        loss = sum(module.losses(logits, out, batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        return float(module(batch)[1].kept_fraction().mean())


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
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=tmp_path)
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
