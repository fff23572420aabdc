"""Compose a run's configuration from the YAML files in ``conf/``.

``defaults.yaml`` is the base; one file per group (model, task, method, budget, protocol) is merged
on top in that order, then each group file's ``per_task.<task>`` section, then dotted
``key=value`` overrides. Every key a run can take exists in ``defaults.yaml`` or a group
file, so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from tokprune.config.checks import check_config, rule_for
from tokprune.errors import UsageError

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
GROUPS = ("model", "task", "method", "budget", "protocol")


def choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The names a group accepts: the stems of ``conf/<group>/*.yaml``."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    return data


def split_overrides(args: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Split CLI words into group selections (``task=qqp``) and dotted overrides."""
    groups: dict[str, str] = {}
    dotted: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"bad argument '{arg}': expected key=value, e.g. task=sst2 or train.lr=3e-5")
        if key in GROUPS:
            groups[key] = value
        else:
            dotted.append(arg)
    return groups, dotted


def _allowed(base: DictConfig, key: str) -> str:
    """`` (expected ...)``: what the key's rule accepts, or nothing when it has no rule."""
    rule = rule_for(key, OmegaConf.select(base, "method.name"))
    if rule is None:
        return ""
    rules = rule if isinstance(rule, tuple) else (rule,)
    return f" (expected {' or '.join(r.describe() for r in rules)})"


def _check_override(base: DictConfig, key: str, raw: str):
    """Parse one override value and check it against the key's existing value."""
    current: object = base
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(current, DictConfig) or part not in current:
            parent = ".".join(parts[:depth]) or "the top level"
            valid = ", ".join(sorted(current.keys())) if isinstance(current, DictConfig) else "none"
            raise UsageError(f"unknown config key '{key}': valid keys under {parent}: {valid}")
        current = current[part]
    if isinstance(current, DictConfig):
        raise UsageError(f"'{key}' is a section, not a value: set one of {', '.join(current.keys())}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(current, bool) and not isinstance(value, bool):
        raise UsageError(f"bad value for {key}: '{raw}' is not true/false")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"bad value for {key}: '{raw}' is not a number{_allowed(base, key)}")
        if isinstance(current, float):
            value = float(value)
    return value


# Keys that change where things go or how they are shown, never a run's numbers.
NEUTRAL = (
    "mlflow.",
    "report.",
    "data.glue_dir",
    "data.hub_dataset",
    "data.num_workers",
    "train.checkpoint_dir",
    "train.progress_bar",
    "train.log_every_n_steps",
)


def override(key: str, value) -> str:
    """``key=value`` in the form ``config.compose`` parses back to the same value."""
    return f"{key}={json.dumps(value)}"


def compose(args: Iterable[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Build the resolved config of one run from CLI-style ``key=value`` words."""
    groups, dotted = split_overrides(args)
    cfg = OmegaConf.create(_load_yaml(conf_dir / "defaults.yaml"))
    selected = {g: groups.get(g, cfg[g].name) for g in GROUPS}
    per_task_sections = []
    for group in GROUPS:
        name = selected[group]
        valid = choices(group, conf_dir)
        if name not in valid:
            raise UsageError(f"unknown {group} '{name}': choose from {', '.join(valid)}")
        data = _load_yaml(conf_dir / group / f"{name}.yaml")
        per_task_sections.append(data.pop("per_task", {}) or {})
        cfg = OmegaConf.merge(cfg, data)
    for sections in per_task_sections:
        if selected["task"] in sections:
            cfg = OmegaConf.merge(cfg, sections[selected["task"]])
    for item in dotted:
        key, _, raw = item.partition("=")
        OmegaConf.update(cfg, key, _check_override(cfg, key, raw), merge=False)
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # interpolation errors name the key
        raise UsageError(f"config does not resolve: {exc}") from None
    check_config(cfg)
    return cfg


def flat_params(cfg: DictConfig) -> dict[str, object]:
    """The config as ``{"train.lr": 5e-5, ...}``, the form MLflow params take."""

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    return dict(walk(OmegaConf.to_container(cfg, resolve=True), ""))
