"""Configuration: groups compose in order, overrides are checked against known keys."""

import pytest

from tokprune.config import choices, compose, flat_params
from tokprune.errors import UsageError


def test_defaults_select_the_baseline_on_sst2_with_minilm():
    cfg = compose([])
    assert (cfg.method.name, cfg.task.name, cfg.model.name, cfg.budget.name) == ("none", "sst2", "minilm", "cpu")


def test_every_required_choice_exists():
    assert set(choices("task")) == {"sst2", "qqp", "mrpc", "rte", "cola", "stsb", "qnli", "mnli"}
    assert {"minilm", "bert-base"} <= set(choices("model"))
    assert {"smoke", "cpu", "full"} <= set(choices("budget"))
    assert "none" in choices("method")


def test_group_files_merge_and_per_task_sections_apply():
    cfg = compose(["task=mrpc", "budget=cpu"])
    assert cfg.task.max_length == 128
    assert cfg.train.epochs == 3  # budget/cpu.yaml per_task.mrpc
    assert compose(["task=sst2", "budget=cpu"]).train.epochs == 2


def test_dotted_overrides_win_and_are_typed():
    cfg = compose(["budget=smoke", "train.lr=3e-5", "train.batch_size=8", "data.train_subset=10"])
    assert cfg.train.lr == pytest.approx(3e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8
    assert cfg.data.train_subset == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["task=foo"], "unknown task 'foo': choose from cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb"),
        (["method=nope"], "unknown method 'nope': choose from"),
        (["train.lrr=1"], "unknown config key 'train.lrr': valid keys under train:"),
        (["bogus.key=1"], "unknown config key 'bogus.key': valid keys under the top level:"),
        (["train.lr=fast"], "bad value for train.lr: 'fast' is not a number"),
        (["train.deterministic=maybe"], "bad value for train.deterministic: 'maybe' is not true/false"),
        (["train=3"], "'train' is a section, not a value"),
        (["oops"], "bad argument 'oops': expected key=value"),
    ],
)
def test_bad_input_is_one_clear_error(args, message):
    with pytest.raises(UsageError) as err:
        compose(args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_error_lists_the_valid_keys():
    with pytest.raises(UsageError, match="lr") as err:
        compose(["train.lrr=1"])
    assert "batch_size" in str(err.value)


def test_flat_params_are_dotted():
    params = flat_params(compose(["budget=smoke"]))
    assert params["train.max_steps"] == 4
    assert params["task.name"] == "sst2"
