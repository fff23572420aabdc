"""What a sweep is: its search space (``sweeps/<method>.yaml``) and the checked plan.

A file names the config keys a sweep samples and how many trials it runs by default::

    trials:                      # total trials when TRIALS is not given, per budget
      smoke: 3
      cpu: 8
      full: 30
    params:                      # config key -> distribution (Optuna's suggest_* arguments)
      method.skim_lambda: {distribution: float, low: 0.05, high: 2.0, log: true}
      method.variant: {distribution: categorical, choices: [a, b]}
      protocol.target_flops: {distribution: grid, values: [0.5, 0.4, 0.6]}  # one trial per value, in this order
    baseline_checkpoint: method.teacher_checkpoint   # optional: this key gets the unpruned
                                 # baseline's checkpoint in every trial (unless the command sets it)
    per_budget:                  # optional: a budget's own ranges, replacing or adding to params
      cpu:
        params:
          method.skim_lambda: {distribution: float, low: 0.01, high: 0.1, log: true}
          method.predictor_lr: {distribution: categorical, choices: [1.0e-3]}   # one choice: fixed
    per_protocol:                # optional: a protocol's own space (params, per_budget, baseline_checkpoint),
      paper:                     # replacing the top-level one, which is protocol=shared's
        params: {method.skim_lambda: {distribution: float, low: 0.05, high: 2.0, log: true}}

Under ``protocol=shared`` every method's top-level ``params`` sweep ``protocol.target_flops`` over
the same range (plus at most one or two quality knobs it needs), so the fronts share their x-axis.

Distributions: ``float`` and ``int`` (``low`` < ``high``, optional ``log`` or ``step``),
``categorical`` (``choices``) and ``grid`` (``values``): a fixed list that the trials take one
each, in the listed order, so that every method's front has points at the same values and a
sweep stopped early has the first (most wanted) ones; at most one grid per space, and a sweep
asks for no more trials than it has values. Everything wrong with a file, or with the command, is a
one-line ``UsageError`` found by ``plan_sweep`` before anything trains.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from tokprune.config import CONF_DIR, NEUTRAL, _load_yaml, choices, compose, override, split_overrides
from tokprune.core.data import get_task
from tokprune.errors import UsageError
from tokprune.training.tracking import resolve_tracking_uri, store_dir

SWEEPS_DIR = Path(__file__).resolve().parent.parent.parent / "sweeps"
FLOPS = "flops_ratio_real"  # the second objective: FLOPs vs the same examples unpruned

FIELDS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
    "grid": {"values"},
}


@dataclass(frozen=True)
class Param:
    key: str  # a dotted config key, e.g. method.skim_lambda
    distribution: str  # float | int | categorical | grid (choices: the grid's values, in trial order)
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    recorded_order: tuple = ()  # the choices in the order a resumed study recorded them (as_recorded)

    def suggest(self, trial: optuna.Trial):
        if self.distribution == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.distribution == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.recorded_order or self.choices))

    def optuna_distribution(self) -> optuna.distributions.BaseDistribution:
        """The distribution ``suggest`` samples from, for trials added without sampling."""
        if self.distribution == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.distribution == "int":
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution(list(self.recorded_order or self.choices))

    def values_to_check(self) -> list:
        """Values that must be valid settings of the key: the range ends, or every choice."""
        return list(self.choices) if self.distribution in ("categorical", "grid") else [self.low, self.high]

    def describe(self) -> str:
        if self.distribution in ("categorical", "grid"):
            return f"{self.distribution} {list(self.choices)}"
        extra = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.distribution} [{self.low}, {self.high}]{extra}"


@dataclass(frozen=True)
class SearchSpace:
    method: str
    path: Path
    params: tuple[Param, ...]
    trials: dict[str, int]  # budget name (or "default") -> total trials
    baseline_checkpoint: str | None = None  # a config key that gets the baseline's checkpoint path
    per_budget: dict[str, tuple[Param, ...]] = field(default_factory=dict)  # budget -> params replacing or adding
    per_protocol: dict[str, SearchSpace] = field(default_factory=dict)  # protocol -> its own space

    def for_run(self, protocol: str, budget: str) -> SearchSpace:
        """The space a sweep under ``protocol`` at ``budget`` samples: the protocol's own space if the
        file has one (else the top-level one), with that budget's entries merged in."""
        space = self.per_protocol.get(protocol, self)
        merged = {p.key: p for p in space.params} | {p.key: p for p in space.per_budget.get(budget, ())}
        return replace(space, params=tuple(merged.values()), per_budget={}, per_protocol={})

    def default_trials(self, budget: str) -> int:
        if budget in self.trials:
            return self.trials[budget]
        if "default" in self.trials:
            return self.trials["default"]
        raise UsageError(f"{self.path}: no trial count for budget '{budget}': add trials.{budget} or give TRIALS=")

    def suggest(self, trial: optuna.Trial) -> dict[str, object]:
        return {p.key: p.suggest(trial) for p in self.params}

    @property
    def grid(self) -> Param | None:
        """The space's ``grid`` parameter, if it has one (at most one)."""
        return next((p for p in self.params if p.distribution == "grid"), None)

    def describe(self) -> dict[str, str]:
        return {p.key: p.describe() for p in self.params}

    def as_recorded(self, recorded: dict[str, optuna.distributions.BaseDistribution], study: str) -> SearchSpace:
        """This space for resuming ``study``, whose trials sampled ``recorded``. Optuna refuses a
        categorical whose list differs from the study's, even only in order, and would fail every
        trial: a grid or choice list reordered in the file keeps its new trial order and samples
        from the study's list; any change Optuna refuses is a one-line error before anything trains."""
        params = []
        for p in self.params:
            old = recorded.get(p.key)
            if isinstance(old, optuna.distributions.CategoricalDistribution) and sorted(
                map(repr, old.choices)
            ) == sorted(map(repr, p.choices)):  # the same values, maybe reordered
                p = replace(p, recorded_order=tuple(old.choices))
            new = p.optuna_distribution()
            if old is not None:
                try:
                    optuna.distributions.check_distribution_compatibility(old, new)
                except ValueError:
                    raise UsageError(
                        f"study {study} sampled {p.key} from {old}, {self.path} now gives {p.describe()}: "
                        f"name another study for the new space (sweep.study_name=...)"
                    ) from None
            params.append(p)
        return replace(self, params=tuple(params))


def param_strings(params: dict) -> list[str]:
    """``key=value`` per sampled parameter, floats to 4 significant digits: for people to read."""
    return [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()]


def _number(path: Path, key: str, field: str, value, integer: bool):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{path}: {key}: {field} must be {kind}, not {value!r}")
    return value if integer else float(value)


def _param(path: Path, key: str, spec) -> Param:
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: {key}: expected a mapping like {{distribution: float, low: 0.1, high: 1.0}}")
    dist = spec.get("distribution")
    if dist not in FIELDS:
        raise UsageError(f"{path}: {key}: unknown distribution {dist!r}: use one of {', '.join(FIELDS)}")
    unknown = sorted(set(spec) - FIELDS[dist] - {"distribution"})
    if unknown:
        raise UsageError(f"{path}: {key}: unknown field(s) {', '.join(unknown)} for a {dist} distribution")
    if dist in ("categorical", "grid"):
        field = "choices" if dist == "categorical" else "values"
        values = spec.get(field)
        if not isinstance(values, list) or not values:
            raise UsageError(f"{path}: {key}: {field} must be a non-empty list")
        if any(isinstance(v, (dict, list)) for v in values):
            raise UsageError(f"{path}: {key}: {field} must be plain values (numbers, strings, true/false, null)")
        if dist == "grid" and len(set(values)) != len(values):
            raise UsageError(f"{path}: {key}: grid values repeat: each value is one trial")
        return Param(key, dist, choices=tuple(values))
    integer = dist == "int"
    for bound in ("low", "high"):
        if bound not in spec:
            raise UsageError(f"{path}: {key}: missing {bound}")
    low = _number(path, key, "low", spec["low"], integer)
    high = _number(path, key, "high", spec["high"], integer)
    if low >= high:
        raise UsageError(f"{path}: {key}: low ({low}) must be below high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UsageError(f"{path}: {key}: log must be true or false")
    step = spec.get("step")
    if step is not None:
        step = _number(path, key, "step", step, integer)
        if step <= 0:
            raise UsageError(f"{path}: {key}: step must be positive")
        if log:
            raise UsageError(f"{path}: {key}: step and log cannot be combined")
    if log and low <= 0:
        raise UsageError(f"{path}: {key}: a log distribution needs low > 0, not {low}")
    return Param(key, dist, low=low, high=high, log=log, step=step)


def load_space(
    path: Path, method: str, conf_dir: Path = CONF_DIR, data: dict | None = None, where: str = ""
) -> SearchSpace:
    """Read and check the file's structure (not yet whether its keys exist: see ``check_keys``);
    ``data``/``where``: a ``per_protocol`` section of it, read the same way."""
    top = data is None
    data = _load_yaml(path) if top else data
    allowed = {"params", "trials", "baseline_checkpoint", "per_budget", *(("per_protocol",) if top else ())}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(
            f"{path}: unknown {where or 'top-level '}key(s) {', '.join(unknown)}: expected {', '.join(sorted(allowed))}"
        )
    teacher = data.get("baseline_checkpoint")
    if teacher is not None and (not isinstance(teacher, str) or "." not in teacher):
        raise UsageError(f"{path}: baseline_checkpoint must be a dotted config key such as method.teacher_checkpoint")
    parsed = _params(path, data.get("params"), f"{where}params")
    budgets = sorted(choices("budget", conf_dir))
    trials = data.get("trials") or {}
    if not isinstance(trials, dict):
        raise UsageError(f"{path}: trials must map budget names to trial counts, e.g. {{smoke: 3, cpu: 8}}")
    for budget, count in trials.items():
        if budget not in [*budgets, "default"]:
            raise UsageError(f"{path}: trials: unknown budget '{budget}': choose from {', '.join(budgets)}, default")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UsageError(f"{path}: trials.{budget} must be a positive integer, not {count!r}")
    per_budget = data.get("per_budget") or {}
    if not isinstance(per_budget, dict):
        raise UsageError(f"{path}: per_budget must map budget names to {{params: ...}}")
    own = {}
    for budget, section in per_budget.items():
        if budget not in budgets:
            raise UsageError(f"{path}: per_budget: unknown budget '{budget}': choose from {', '.join(budgets)}")
        if not isinstance(section, dict) or set(section) != {"params"}:
            raise UsageError(f"{path}: per_budget.{budget} must hold exactly one key, params")
        own[budget] = tuple(_params(path, section["params"], f"{where}per_budget.{budget}.params"))
    protocols = {}
    sections = data.get("per_protocol") or {}
    if not isinstance(sections, dict):
        raise UsageError(f"{path}: per_protocol must map protocol names to {{params: ...}}")
    for protocol, section in sections.items():
        if protocol not in choices("protocol", conf_dir):
            raise UsageError(
                f"{path}: per_protocol: unknown protocol '{protocol}': choose from "
                f"{', '.join(choices('protocol', conf_dir))}"
            )
        if not isinstance(section, dict):
            raise UsageError(f"{path}: per_protocol.{protocol} must be a mapping with params")
        section = {"trials": data.get("trials"), **section}
        protocols[protocol] = load_space(path, method, conf_dir, section, f"per_protocol.{protocol}.")
    return SearchSpace(
        method=method,
        path=path,
        params=tuple(parsed),
        trials=dict(trials),
        baseline_checkpoint=teacher,
        per_budget=own,
        per_protocol=protocols,
    )


def _params(path: Path, params, where: str) -> list[Param]:
    if not isinstance(params, dict) or not params:
        raise UsageError(f"{path}: {where} must map at least one config key to a distribution")
    for key in params:
        if not isinstance(key, str) or "." not in key:
            raise UsageError(f"{path}: {key!r} is not a dotted config key such as method.skim_lambda")
    parsed = [_param(path, key, spec) for key, spec in params.items()]
    grids = [p.key for p in parsed if p.distribution == "grid"]
    if len(grids) > 1:
        raise UsageError(f"{path}: {where}: at most one grid parameter, not {', '.join(grids)}")
    return parsed


def check_keys(space: SearchSpace, cfg: DictConfig, args: list[str]) -> None:
    """Every parameter must be a config key that accepts every value the space can sample."""
    _, dotted = split_overrides(args)
    given = {item.partition("=")[0] for item in dotted}
    for param in space.params:
        if param.key in given:
            raise UsageError(
                f"{param.key} is searched by {space.path}; drop {param.key}=... from the command "
                "or remove it from the search space"
            )
        for value in param.values_to_check():
            try:
                compose([*args, override(param.key, value)])
            except UsageError as exc:
                raise UsageError(f"{space.path}: {param.key}: {exc}") from None
        current = OmegaConf.select(cfg, param.key)
        if param.distribution == "float" and isinstance(current, int) and not isinstance(current, bool):
            raise UsageError(f"{space.path}: {param.key} holds an integer ({current}): use an int distribution")
    if space.baseline_checkpoint:
        try:
            compose([*args, override(space.baseline_checkpoint, "/a/baseline.ckpt")])
        except UsageError as exc:
            raise UsageError(f"{space.path}: baseline_checkpoint: {exc}") from None


# -- the plan: everything checked before anything trains -----------------------------------


@dataclass
class Plan:
    args: list[str]
    cfg: DictConfig
    space: SearchSpace
    target: int
    workers: int
    study_name: str
    storage: str  # a journal file path or an SQLAlchemy URL
    storage_label: str  # the same, without a password
    tracking_uri: str
    main_metric: str
    startup_trials: int  # random trials before TPE models the front

    @property
    def is_rdb(self) -> bool:
        return "://" in self.storage

    @property
    def passthrough(self) -> list[str]:
        """The command's dotted overrides that reach every trial (all but ``sweep.*``)."""
        return [a for a in split_overrides(self.args)[1] if not a.startswith("sweep.")]

    @property
    def result_overrides(self) -> list[str]:
        """The overrides that can change a result (not paths, logging or the MLflow store, and
        not the seed, which the study's name and the baseline's key hold already): they tell
        apart baselines, and a resumed study warns when they differ."""
        return sorted(
            a for a in self.passthrough if not a.partition("=")[0].startswith(NEUTRAL) and a.partition("=")[0] != "seed"
        )


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"sweep.{name} must be an integer >= {minimum}, not {value!r}")
    return value


def study_storage(storage: str, tracking_uri: str) -> str:
    """Where the studies live: ``storage`` as given (a URL, or a journal path made absolute), or
    by default ``optuna.journal`` beside the MLflow store."""
    if "://" in storage:
        return storage
    return str(Path(storage or (store_dir(tracking_uri) or Path()) / "optuna.journal").resolve())


def storage_label(url: str) -> str:
    """The storage as shown in logs, tags and reports: a database URL without its password."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    accepted = (
        "a journal file path (default: optuna.journal beside mlflow.db) or an SQLAlchemy database URL "
        "that Optuna's RDB storage takes, e.g. postgresql://user@host/db, mysql://user@host/db, "
        "sqlite:////path/optuna.db"
    )
    try:
        parsed = make_url(url)
    except Exception:
        raise UsageError(f"storage '{url}' is not a database URL: give {accepted}") from None
    try:
        parsed.get_dialect()
    except Exception:  # SQLAlchemy knows no such database (e.g. mongodb://)
        raise UsageError(
            f"storage '{parsed.render_as_string(hide_password=True)}': SQLAlchemy has no dialect "
            f"'{parsed.drivername}'; give {accepted}"
        ) from None
    return parsed.render_as_string(hide_password=True)


def study_name(method: str, cfg: DictConfig) -> str:
    """``<method>-<task>-<model>-<budget>-<protocol>-seed<seed>``; protocol=paper studies keep the name
    they had before protocols existed (no protocol part), so committed reports still resume, and so
    do the studies of a method that follows no protocol (``none``)."""
    follows = getattr(importlib.import_module(f"tokprune.methods.{method}").Method, "follows_protocol", False)
    protocol = f"-{cfg.protocol.name}" if follows and cfg.protocol.name != "paper" else ""
    return f"{method}-{cfg.task.name}-{cfg.model.name}-{cfg.budget.name}{protocol}-seed{cfg.seed}"


def plan_sweep(args: list[str]) -> Plan:
    groups, _ = split_overrides(args)
    base = compose([a for a in args if a.startswith("sweep.")])
    method = groups.get("method", base.method.name)
    space_dir = Path(base.sweep.space_dir or SWEEPS_DIR)
    path = space_dir / f"{method}.yaml"
    if not path.is_file():
        if method in choices("method"):
            raise UsageError(f"no search space for method '{method}': write {path} (see sweeps/transkimmer.yaml)")
        known = ", ".join(sorted(p.stem for p in space_dir.glob("*.yaml"))) or "none"
        raise UsageError(f"unknown method '{method}': methods with a search space in {space_dir}: {known}")
    space = load_space(path, method)
    if method not in choices("method") or importlib.util.find_spec(f"tokprune.methods.{method}") is None:
        raise UsageError(
            f"method '{method}' is not implemented yet: {path} exists, but tokprune/methods/{method}.py "
            f"and conf/method/{method}.yaml are needed before it can be swept"
        )
    cfg = compose(args)
    space = space.for_run(cfg.protocol.name, cfg.budget.name)
    check_keys(space, cfg, args)
    s = cfg.sweep
    target = space.default_trials(cfg.budget.name) if s.trials is None else _positive_int("trials", s.trials)
    if space.grid and target > len(space.grid.choices):
        raise UsageError(
            f"{space.path}: {space.grid.key} is a grid of {len(space.grid.choices)} values, one trial each: "
            f"ask for at most {len(space.grid.choices)} trials, not {target}"
        )
    for name in ("heartbeat_interval", "grace_period", "max_failures", "poll_seconds"):
        _positive_int(name, s[name])
    # Optuna's default of 10 random trials would leave a cpu sweep (8-12 trials) all random.
    startup = max(3, target // 3) if s.startup_trials is None else _positive_int("startup_trials", s.startup_trials)
    _positive_int("max_retry", s.max_retry, minimum=0)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    storage = study_storage(str(s.storage or ""), tracking_uri)
    name = s.study_name or study_name(method, cfg)
    return Plan(
        args=list(args),
        cfg=cfg,
        space=space,
        target=target,
        workers=_positive_int("workers", s.workers),
        study_name=str(name),
        storage=storage,
        storage_label=storage_label(storage),
        tracking_uri=tracking_uri,
        main_metric=get_task(cfg.task.name).main_metric,
        startup_trials=startup,
    )
