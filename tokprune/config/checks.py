"""Type and range checks of every config key, run at the end of ``config.compose``.

A bad value fails here, as one line naming the key, the value and what is allowed, instead
of deep inside Lightning or a method after a model has loaded and an MLflow run has opened.
Shared keys have their rule in ``RULES``; a method's own ``method.*`` keys in
``METHOD_RULES[<method name>]``, so a new method adds one entry here. tests/test_checks.py
fails when a config key has no rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from tokprune.errors import UsageError

KINDS = {"int": "an integer", "float": "a number", "str": "a non-empty string", "bool": "true or false"}


@dataclass(frozen=True)
class Rule:
    """What one key accepts: a kind, optionally null, a range and/or a list of choices."""

    kind: str | None = None  # int | float | str | bool; None: any kind, for `choices` that mix them
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: `low` itself is refused
    high_open: bool = False
    choices: tuple = ()
    empty: bool = False  # str: "" allowed (it means "the default" for some paths)
    special: Callable[[object], str | None] | None = None  # a last check: why the value is refused, or None

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or self.kind == "bool":  # a bool is never a number here
            ok = isinstance(value, bool) and self.kind in ("bool", None)
        elif self.kind == "int":
            ok = isinstance(value, int)
        elif self.kind == "float":
            ok = isinstance(value, (int, float)) and math.isfinite(value)
        elif self.kind == "str":
            ok = isinstance(value, str) and (self.empty or value != "")
        else:
            ok = True
        if not ok or (self.choices and not any(type(value) is type(c) and value == c for c in self.choices)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.choices:
            names = list(dict.fromkeys(str(c) for c in self.choices))
            text = ("one of " if len(names) > 1 else "") + ", ".join(names)
        else:
            text = "a string" if self.kind == "str" and self.empty else KINDS[self.kind]
        if self.low is not None and self.high is not None:
            text += f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {self.high}"
        return f"null or {text}" if self.nullable else text


def _accelerator_here(name: str) -> str | None:
    """Asking for a GPU that is not there would fail only once Lightning builds its Trainer."""
    if name not in ("gpu", "cuda", "mps"):
        return None
    import torch

    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        return "no such device on this machine: torch.cuda.is_available() is False; use cpu or auto"
    if name == "mps" and not torch.backends.mps.is_available():
        return "no such device on this machine: torch.backends.mps.is_available() is False; use cpu or auto"
    return None


COMMON_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")


def _known_strategy(name: str) -> str | None:
    """Lightning's registry is imported only for an uncommon name: compose stays light."""
    if name in COMMON_STRATEGIES:
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    known = sorted(set(StrategyRegistry.keys()) | set(COMMON_STRATEGIES))
    return None if name in known else f"expected a strategy Lightning knows: {', '.join(known)}"


INT = "int"
FLOAT = "float"
STR = Rule("str")
PATH = Rule("str", empty=True)
FRACTION_OR_COUNT = (Rule(FLOAT, low=0, high=1, low_open=True), Rule(INT, low=1))  # Lightning: share or batches
FLOPS_TARGET = Rule(FLOAT, low=0, high=1, low_open=True)  # a FLOPs ratio at real length


def _target_list(value) -> str | None:
    """Each entry as ``protocol.target_flops`` accepts it."""
    if isinstance(value, list) and all(FLOPS_TARGET.accepts(v) for v in value):
        return None
    return "expected a list of FLOPs targets in (0, 1], e.g. [0.5] or []"


PRECISIONS = (
    "32-true",
    "32",
    32,
    "16-mixed",
    "bf16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "64",
    64,
    "16",
    16,
    "bf16",
)

# Shared keys, dotted. A tuple of rules: the value must pass one of them.
RULES: dict[str, Rule | tuple[Rule, ...]] = {
    "seed": Rule(INT, low=0, high=2**32 - 1),
    "method.name": STR,  # the group names are checked against conf/ by compose
    "task.name": STR,
    "task.max_length": Rule(INT, low=2, high=512),  # [CLS] + one token .. BERT's position table
    "model.name": STR,
    "model.package": Rule("str", nullable=True),
    "model.name_or_path": STR,
    **{
        f"model.random_init.{k}": Rule(INT, low=1)
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    },
    "budget.name": STR,
    "protocol.name": STR,
    "protocol.baseline_checkpoint": Rule("str", nullable=True),  # existence and fit: checked when it loads
    "protocol.distill_weight": Rule(FLOAT, low=0, high=1),
    "protocol.temperature": Rule(FLOAT, low=0, low_open=True),
    "protocol.teacher_cache": Rule("bool"),
    "protocol.target_flops": FLOPS_TARGET,
    "protocol.target_warmup": Rule(FLOAT, low=0, high=1),  # a fraction of training
    "protocol.hard_phase": Rule(FLOAT, low=0, high=1, high_open=True),  # a fraction of training
    "protocol.constraint": Rule("str", choices=("lagrangian", "quadratic")),
    "protocol.target_lr": Rule(FLOAT, low=0, low_open=True),
    "protocol.constraint_weight": Rule(FLOAT, low=0),
    "protocol.selection_epsilon": Rule(FLOAT, low=0, high=1),
    "data.glue_dir": PATH,
    "data.hub_dataset": STR,
    "data.train_subset": Rule(INT, nullable=True, low=1),
    "data.eval_subset": Rule(INT, nullable=True, low=1),
    "data.num_workers": Rule(INT, low=0),
    "train.lr": Rule(FLOAT, low=0, low_open=True),
    "train.weight_decay": Rule(FLOAT, low=0),
    "train.warmup_ratio": Rule(FLOAT, low=0, high=1, high_open=True),
    "train.batch_size": Rule(INT, low=1),
    "train.eval_batch_size": Rule(INT, low=1),
    "train.epochs": Rule(INT, low=1),
    "train.max_steps": (Rule(INT, choices=(-1,)), Rule(INT, low=1)),
    "train.accumulate_grad_batches": Rule(INT, low=1),
    "train.gradient_clip_val": Rule(FLOAT, nullable=True, low=0),
    "train.val_check_interval": FRACTION_OR_COUNT,
    "train.limit_val_batches": FRACTION_OR_COUNT,
    "train.accelerator": Rule("str", choices=("auto", "cpu", "gpu", "cuda", "mps"), special=_accelerator_here),
    "train.devices": (Rule(INT, low=1), Rule("str", choices=("auto",))),
    "train.strategy": Rule("str", special=_known_strategy),
    "train.precision": Rule(choices=PRECISIONS),
    "train.deterministic": Rule("bool"),
    "train.log_every_n_steps": Rule(INT, low=1),
    "train.progress_bar": Rule("bool"),
    "train.checkpoint_dir": STR,
    "mlflow.tracking_uri": STR,
    "mlflow.experiment": STR,
    "mlflow.run_name": Rule("str", nullable=True),
    "mlflow.stale_hours": Rule(FLOAT, low=0, low_open=True),
    "sweep.trials": Rule(INT, nullable=True, low=1),
    "sweep.workers": Rule(INT, low=1),
    "sweep.storage": PATH,
    "sweep.space_dir": PATH,
    "sweep.study_name": Rule("str", nullable=True),
    "sweep.startup_trials": Rule(INT, nullable=True, low=0),
    "sweep.heartbeat_interval": Rule(INT, low=1),  # seconds; Optuna takes whole seconds
    "sweep.grace_period": Rule(INT, low=1),
    "sweep.max_retry": Rule(INT, low=0),
    "sweep.max_failures": Rule(INT, low=1),
    "sweep.poll_seconds": Rule(INT, low=1),
    "sweep.keep_checkpoints": Rule("str", choices=("pareto", "all")),
    "sweep.resume_from": PATH,
    "report.dir": PATH,
    "report.carry": PATH,
    "report.speedup_examples": Rule(INT, low=0),
    "report.flops_budget": Rule("float", low=0.0, low_open=True),
    "report.metric_tolerance": Rule("float", low=0.0, high=1.0),
    "report.timed_targets": Rule(special=_target_list),
}


# A method's own keys, relative to `method.`; applied only when `method.name` is that method.
def _layer_list(value) -> str | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return None
    return "expected a non-empty list of 0-based layer indices, e.g. [2,3,4,5]"


def _weight_list(value) -> str | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in value)
        and sum(value) > 0
    ):
        return None
    return "expected a non-empty list of non-negative numbers, not all 0, one per layer, e.g. [0,0,1,1,1,1]"


METHOD_RULES: dict[str, dict[str, Rule | tuple[Rule, ...]]] = {
    "none": {},
    "transkimmer": {
        "skim_lambda": Rule(FLOAT, low=0),
        "tau": Rule(FLOAT, low=0, low_open=True),
        "first_skim_layer": Rule(INT, low=0),
        "keep_bias": Rule(FLOAT),
        "init_checkpoint": Rule("str", nullable=True),  # existence: checked when it loads (sweeps plan with a
        # placeholder path, and their baseline's does not exist yet)
        "predictor_lr": Rule(FLOAT, nullable=True, low=0, low_open=True),
        "train_attention": Rule("str", choices=("reference", "renormalised")),
        "skim_norm": Rule("str", choices=("real", "padded")),
        "skim_target": Rule(FLOAT, nullable=True, low=0, high=1, low_open=True),  # a kept fraction
        "skim_target_mode": Rule("str", choices=("lagrangian", "quadratic")),
        "target_lr": Rule(FLOAT, low=0, low_open=True),
        "skim_warmup": Rule(FLOAT, low=0, high=1),  # a fraction of training
        "skim_layer_weights": Rule(nullable=True, special=_weight_list),  # its length: checked when the model is known
        "skim_loss_on": Rule("str", choices=("cumulative", "own")),
        "train_decisions": Rule("str", choices=("sampled", "argmax")),
        "teacher_checkpoint": Rule("str", nullable=True),  # existence and fit: checked when it loads
        "distill_weight": Rule(FLOAT, low=0, high=1),
        "temperature": Rule(FLOAT, low=0, low_open=True),
    },
    "gate": {
        "lambda_sparse": Rule(FLOAT, low=0),
        "lambda_bimodal": Rule(FLOAT, low=0),
        "bimodal_start": Rule(FLOAT, low=0, high=1),  # fractions of training
        "bimodal_ramp": Rule(FLOAT, low=0, high=1),
        "gate_lr": Rule(FLOAT, low=0, low_open=True),
        "parametrisation": Rule("str", choices=("clipped", "sigmoid")),
        "sigmoid_init": Rule(FLOAT),
        "ranks": Rule("str", choices=("absolute", "bins")),
        "bins": Rule(INT, low=1),
        "first_gated_layer": Rule(INT, low=1),  # its upper end (layers - 1) is checked when the model is known
        "threshold": Rule(FLOAT, low=0, high=1),  # gates live in [0, 1]
        "inference": Rule("str", choices=("threshold", "top_sum", "expected")),
        "straight_through": Rule("bool"),
    },
    "top": {
        "teacher_checkpoint": Rule("str", nullable=True),
        "target_sparsity": Rule(FLOAT, low=0, high=1, high_open=True),
        "target_warmup": Rule(FLOAT, low=0, high=1),  # a fraction of training
        "reg_lr": Rule(FLOAT, low=0, low_open=True),
        "distill_alpha": Rule(FLOAT, low=0),
        "distill_layers": Rule(nullable=True, special=_layer_list),
        "distill_topk": Rule(INT, low=1),
        "temperature": Rule(FLOAT, low=0, low_open=True),
        "bins": Rule(INT, low=1),
        "prunable_layers": Rule(nullable=True, special=_layer_list),
        "selection_epsilon": Rule(FLOAT, low=0, high=1),
        "eval_masks": Rule("str", choices=("expected", "reference")),
        "regression_target": Rule("str", choices=("labels", "teacher")),
    },
    "static": {
        "keep_last": Rule(FLOAT, low=0, high=1, low_open=True),
        "first_pruned_layer": Rule(INT, low=1),  # its upper end (layers - 1) is checked when the model is known
        "finetune": Rule("bool"),
        "init_checkpoint": Rule("str", nullable=True),
    },
}


def rule_for(key: str, method: str | None) -> Rule | tuple[Rule, ...] | None:
    """The rule of a dotted key, or None when it has none."""
    if key.startswith("method.") and key != "method.name":
        return METHOD_RULES.get(method, {}).get(key[len("method.") :])
    return RULES.get(key)


def _coerce(rules: tuple[Rule, ...], value):
    """Type what the override parser cannot: YAML 1.1 reads ``1e-3`` as a string when the key's
    default is null; a whole number arrives as a float when the default is one
    (``val_check_interval=100``, which Lightning would take as a share) or when written
    ``2.0`` or ``1e3``. Only whole floats become ints: ``epochs=2.5`` stays 2.5 and is refused."""
    kinds = {r.kind for r in rules}
    if isinstance(value, str) and FLOAT in kinds and "str" not in kinds:
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer() and INT in kinds and not any(r.accepts(value) for r in rules):
        return int(value)
    return value


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_config(cfg: DictConfig) -> None:
    """Raise a one-line ``UsageError`` for the first value its rule refuses. Keys without a rule
    pass (tests/test_checks.py keeps that set empty); values the override parser could not type
    (see ``_coerce``) are written back typed."""
    method = OmegaConf.select(cfg, "method.name")
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        rule = rule_for(key, method)
        if rule is None:
            continue
        rules = rule if isinstance(rule, tuple) else (rule,)
        typed = _coerce(rules, value)
        if typed is not value:
            OmegaConf.update(cfg, key, typed, merge=False)
            value = typed
        passing = [r for r in rules if r.accepts(value)]
        if not passing:
            expected = " or ".join(r.describe() for r in rules)
            raise UsageError(f"bad value for {key}: {_show(value)} (expected {expected})")
        why = next((r.special(value) for r in passing if r.special and value is not None), None)
        if why:
            raise UsageError(f"bad value for {key}: {_show(value)} ({why})")
    check_hard_phase(cfg)


def check_hard_phase(cfg: DictConfig) -> None:
    """``protocol.hard_phase`` against the keys it meets: it starts after the target has ramped in,
    and under DDP its frozen decision parameters are unused (Lightning's ``ddp`` refuses those)."""
    phase = float(OmegaConf.select(cfg, "protocol.hard_phase", default=0.0) or 0.0)
    if phase <= 0:
        return
    warmup = float(OmegaConf.select(cfg, "protocol.target_warmup", default=0.0) or 0.0)
    if phase + warmup > 1:
        raise UsageError(
            f"protocol.hard_phase={phase:g} + protocol.target_warmup={warmup:g} > 1: the decisions would "
            "freeze before the FLOPs target has ramped in"
        )
    devices, strategy = OmegaConf.select(cfg, "train.devices", default=1), OmegaConf.select(cfg, "train.strategy")
    if devices != 1 and strategy in ("auto", "ddp", "ddp_spawn"):
        raise UsageError(
            f"protocol.hard_phase with train.devices={devices}: the frozen decision parameters get no gradient, "
            "which train.strategy=ddp refuses; use train.strategy=ddp_find_unused_parameters_true"
        )
