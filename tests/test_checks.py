"""Every config value is checked after composition: a bad one is a one-line error naming the
key, the value and what is allowed, before a model loads or an MLflow run opens."""

import os
import subprocess
import sys

import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from tokprune.cli import main
from tokprune.config import checks, choices, compose
from tokprune.config.checks import METHOD_RULES, RULES, check_config, rule_for
from tokprune.errors import UsageError

from conftest import GLUE, QQP_SAMPLE, ROOT


def leaves(cfg) -> list[str]:
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return list(walk(OmegaConf.to_container(cfg, resolve=True), ""))


def all_configs():
    """One composed config per method x model x budget (the groups that add keys), and per task."""
    for method in choices("method"):
        for model in choices("model"):
            for budget in choices("budget"):
                yield compose([f"method={method}", f"model={model}", f"budget={budget}"])
    for task in choices("task"):
        yield compose([f"task={task}"])


# -- the rule table ---------------------------------------------------------------------------


def test_every_method_has_rules_and_every_key_a_rule():
    """A method (or anyone) cannot add a config key without saying what it accepts."""
    assert set(choices("method")) <= set(METHOD_RULES), "add the method's rules to tokprune/checks.py METHOD_RULES"
    missing = sorted(
        {
            f"{key} (method={cfg.method.name})"
            for cfg in all_configs()
            for key in leaves(cfg)
            if rule_for(key, cfg.method.name) is None
        }
    )
    assert not missing, f"config keys without a rule in tokprune/checks.py: {missing}"


def test_no_rule_for_a_key_that_does_not_exist():
    keys = {(key, cfg.method.name) for cfg in all_configs() for key in leaves(cfg)}
    assert not set(RULES) - {k for k, _ in keys}, "stale rules in RULES"
    for method, rules in METHOD_RULES.items():
        assert not {f"method.{k}" for k in rules} - {k for k, m in keys if m == method}, f"stale rules for {method}"


def test_method_rules_apply_only_to_their_method():
    assert rule_for("method.tau", "transkimmer") is not None
    assert rule_for("method.tau", "none") is None and rule_for("method.tau", None) is None
    assert rule_for("method.name", "transkimmer") is RULES["method.name"]


def test_every_shipped_combination_passes():
    for cfg in all_configs():
        check_config(cfg)


# -- check_config on composed configs ---------------------------------------------------------


def with_value(key: str, value, *groups: str):
    cfg = compose(["model=tiny", *groups])
    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.batch_size", 0, "bad value for train.batch_size: 0 (expected an integer >= 1)"),
        (
            "train.batch_size",
            True,
            "bad value for train.batch_size: true (expected an integer >= 1)",
        ),  # bools: not ints
        ("train.batch_size", 8.5, "bad value for train.batch_size: 8.5 (expected an integer >= 1)"),
        ("train.batch_size", 0.0, "bad value for train.batch_size: 0 (expected an integer >= 1)"),
        ("train.batch_size", "8", "bad value for train.batch_size: '8' (expected an integer >= 1)"),
        ("train.lr", False, "bad value for train.lr: false (expected a number > 0)"),
        ("train.lr", float("inf"), "bad value for train.lr: inf (expected a number > 0)"),
        ("train.lr", None, "bad value for train.lr: null (expected a number > 0)"),
        ("train.warmup_ratio", 1.0, "bad value for train.warmup_ratio: 1.0 (expected a number in [0, 1))"),
        ("train.max_steps", -2, "bad value for train.max_steps: -2 (expected -1 or an integer >= 1)"),
        ("train.val_check_interval", 0.0, "(expected a number in (0, 1] or an integer >= 1)"),
        ("train.limit_val_batches", 1.5, "bad value for train.limit_val_batches: 1.5 (expected a number in (0, 1]"),
        ("train.devices", "all", "bad value for train.devices: 'all' (expected an integer >= 1 or auto)"),
        ("train.deterministic", 1, "bad value for train.deterministic: 1 (expected true or false)"),
        ("train.precision", 8, "bad value for train.precision: 8 (expected one of 32-true, 32, 16-mixed"),
        ("train.precision", True, "bad value for train.precision: true"),
        ("train.checkpoint_dir", "", "bad value for train.checkpoint_dir: '' (expected a non-empty string)"),
        ("seed", -1, "bad value for seed: -1 (expected an integer in [0, 4294967295])"),
        ("model.random_init.num_hidden_layers", 0, "bad value for model.random_init.num_hidden_layers: 0"),
        ("sweep.workers", 0, "bad value for sweep.workers: 0 (expected an integer >= 1)"),
        ("sweep.poll_seconds", 0.5, "bad value for sweep.poll_seconds: 0.5 (expected an integer >= 1)"),
        ("report.speedup_examples", -1, "bad value for report.speedup_examples: -1 (expected an integer >= 0)"),
    ],
)
def test_bad_values_are_one_line_naming_key_value_and_what_is_allowed(key, value, message):
    with pytest.raises(UsageError) as err:
        check_config(with_value(key, value))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("method.first_skim_layer", -1, "bad value for method.first_skim_layer: -1 (expected an integer >= 0)"),
        ("method.keep_bias", "big", "bad value for method.keep_bias: 'big' (expected a number)"),
        ("method.predictor_lr", 0, "bad value for method.predictor_lr: 0 (expected null or a number > 0)"),
        ("method.init_checkpoint", 3, "bad value for method.init_checkpoint: 3 (expected null or a non-empty string)"),
    ],
)
def test_transkimmer_values(key, value, message):
    with pytest.raises(UsageError) as err:
        check_config(with_value(key, value, "method=transkimmer"))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.lr", 1),  # ints are numbers
        ("train.gradient_clip_val", None),
        ("train.max_steps", -1),
        ("train.val_check_interval", 0.25),
        ("train.val_check_interval", 50),
        ("train.limit_val_batches", 10),
        ("train.devices", "auto"),
        ("train.precision", 16),
        ("train.precision", "bf16-mixed"),
        ("train.strategy", "ddp_spawn_find_unused_parameters_false"),  # from Lightning's registry
        ("data.train_subset", None),
        ("sweep.startup_trials", 0),
    ],
)
def test_good_values_pass(key, value):
    check_config(with_value(key, value))


def test_values_the_override_parser_cannot_type_are_typed():
    """YAML 1.1 reads 1e-3 as a string under a null default; a whole number given to a key
    whose default is a float (or written 2.0 or 1e3) arrives as a float."""
    cfg = compose(
        [
            "method=transkimmer",
            "method.predictor_lr=1e-3",
            "train.val_check_interval=100",
            "train.epochs=2.0",
            "data.train_subset=1e3",
        ]
    )
    assert cfg.method.predictor_lr == 1e-3 and isinstance(cfg.method.predictor_lr, float)
    assert cfg.train.val_check_interval == 100 and isinstance(cfg.train.val_check_interval, int)
    assert type(cfg.train.epochs) is int and type(cfg.data.train_subset) is int and cfg.data.train_subset == 1000
    assert compose(["train.val_check_interval=0.5"]).train.val_check_interval == 0.5
    assert type(compose(["train.val_check_interval=1.0"]).train.val_check_interval) is float  # a share: 1 epoch


def test_a_gpu_is_accepted_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compose(["train.accelerator=gpu"]).train.accelerator == "gpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="bad value for train.accelerator: 'mps' .no such device on this machine"):
        compose(["train.accelerator=mps"])


def test_a_new_methods_rules_are_a_few_lines(monkeypatch):
    monkeypatch.setitem(
        METHOD_RULES, "transkimmer", {**METHOD_RULES["transkimmer"], "tau": checks.Rule("float", low=0.5, high=2.0)}
    )
    with pytest.raises(UsageError, match=r"method.tau: 0.25 \(expected a number in \[0.5, 2.0\]\)"):
        compose(["method=transkimmer", "method.tau=0.25"])


# -- through the command line -----------------------------------------------------------------

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

BAD = [
    (["train.batch_size=0"], "train.batch_size: 0"),
    (["train.lr=-1"], "train.lr: -1.0"),
    (["train.lr=0"], "train.lr: 0.0"),
    (["train.epochs=0"], "train.epochs: 0"),
    (["train.epochs=2.5"], "train.epochs: 2.5"),
    (["train.max_steps=0"], "train.max_steps: 0"),
    (["data.train_subset=0"], "data.train_subset: 0"),
    (["data.eval_subset=-5"], "data.eval_subset: -5"),
    (["task.max_length=1"], "task.max_length: 1"),
    (["task.max_length=100000"], "task.max_length: 100000"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio: 1.5"),
    (["train.precision=8-bit"], "train.precision: '8-bit'"),
    pytest.param(["train.accelerator=gpu"], "train.accelerator: 'gpu' (no such device on this machine", marks=NO_GPU),
    (["train.devices=0"], "train.devices: 0"),
    (["train.strategy=bogus"], "train.strategy: 'bogus'"),
    (["method=transkimmer", "method.tau=0"], "method.tau: 0.0"),
    (["method=transkimmer", "method.skim_lambda=-1"], "method.skim_lambda: -1.0"),
    (["method=transkimmer", "method.train_attention=magic"], "method.train_attention: 'magic'"),
    (["train.gradient_clip_val=-1"], "train.gradient_clip_val: -1.0"),
    (["data.num_workers=-1"], "data.num_workers: -1"),
    (["train.log_every_n_steps=0"], "train.log_every_n_steps: 0"),
    (["train.val_check_interval=1.5"], "train.val_check_interval: 1.5"),
    (["method=transkimmer", "method.predictor_lr=-1e-3"], "method.predictor_lr: -0.001"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the whole table: it must end up holding no run left RUNNING."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def cli_env(monkeypatch, store, glue_dir):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.setenv("GLUE_DIR", glue_dir)
    monkeypatch.chdir(store)  # the checkpoint folder, had a run started, lands here


@pytest.mark.parametrize("extra, named", BAD)
def test_cli_bad_value_is_one_line_exit_2(extra, named, cli_env, capsys):
    code = main(["train", "model=tiny", "budget=smoke", *extra])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"tokprune: error: bad value for {named}"), lines
    assert "expected" in lines[0] or "no such device" in lines[0]
    assert "Traceback" not in out + err


def test_the_table_opened_no_mlflow_run(store):
    db = store / "mlflow.db"
    if not db.exists():
        return  # no store was even created: no run
    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL) if experiments else []
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert not runs, "a bad value got as far as an MLflow run"


@pytest.mark.parametrize(
    "extra, line",
    [
        (["train.batch_size=0"], "tokprune: error: bad value for train.batch_size: 0 (expected an integer >= 1)"),
        (
            ["method=transkimmer", "method.train_attention=magic"],
            "tokprune: error: bad value for method.train_attention: 'magic' (expected one of reference, renormalised)",
        ),
    ],
)
def test_the_command_line_exits_2(extra, line, tmp_path):
    env = {**os.environ, "GLUE_DIR": f"{GLUE}:{QQP_SAMPLE}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run(
        [sys.executable, "-m", "tokprune", "train", "model=tiny", "budget=smoke", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists()
