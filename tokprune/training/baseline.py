"""The unpruned baseline of a configuration, found in the MLflow store or trained once.

The same fine-tuned ``method=none`` run (same task, model, budget, seed and result-changing
overrides) is the FLOPs-ratio-1.0 point of every sweep of that configuration and the teacher
or initial weights of the methods that need one (ToP). It is found by tags, so a sweep, a
later sweep of another method and a single ``train`` all reuse one run and its checkpoint; a
plain ``train method=none`` is tagged so too, and is that run when it comes first.
"""

from __future__ import annotations

from collections.abc import Callable

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from tokprune.config import NEUTRAL, compose, flat_params, override
from tokprune.errors import UsageError
from tokprune.training import tracking as track
from tokprune.training.tracking import resolve_tracking_uri

GROUPS = ("task", "model", "budget")


def result_overrides(cfg: DictConfig) -> list[str]:
    """The run's non-method settings that differ from its groups' defaults and can change a
    result (not paths, logging or the store, nor the protocol, which the unpruned baseline does
    not follow): what tells two baselines of a task apart."""
    reference = flat_params(compose([*(f"{g}={cfg[g].name}" for g in GROUPS), f"seed={cfg.seed}"]))
    return sorted(
        override(key, value)
        for key, value in flat_params(cfg).items()
        if not key.startswith(("method.", "protocol.", "sweep.", "seed", *NEUTRAL)) and reference.get(key) != value
    )


def baseline_key(cfg: DictConfig) -> dict[str, str]:
    """The tags a baseline run of ``cfg`` carries (besides its role)."""
    extra = result_overrides(cfg)
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "budget": cfg.budget.name,
        "seed": str(cfg.seed),
        "overrides": " ".join(extra) or "none",
    }


def baseline_tags(cfg: DictConfig) -> dict[str, str]:
    """The tags that make a ``method=none`` run the baseline its configuration's runs find."""
    key = baseline_key(cfg)
    return {track.ROLE: "baseline", "overrides": key["overrides"]}


def find_or_train(
    cfg: DictConfig,
    train: Callable,
    say: Callable[[str], None] = print,
    client: MlflowClient | None = None,
    experiment_id: str | None = None,
) -> Run:
    """The finished baseline run of ``cfg`` (whatever its method), training it first with ``train``
    (``training.train.train``, passed in: it calls this module) if the store has none. Its
    ``checkpoint`` tag is the best.ckpt path."""

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = client or MlflowClient(uri)
    experiment_id = experiment_id or track.experiment_id(client, cfg.mlflow.experiment, uri)
    key, extra = baseline_key(cfg), result_overrides(cfg)
    run = track.find_baseline(client, experiment_id, key)
    if run is not None and run.data.tags.get("checkpoint"):
        return run
    if str(cfg.train.devices) not in ("1", "auto"):  # every process would train its own baseline
        raise UsageError(
            "no unpruned baseline for " + " ".join(f"{k}={v}" for k, v in key.items()) + " in the MLflow store, and "
            f"a baseline is not trained inside a run on train.devices={cfg.train.devices}: train it first "
            f"(make train METHOD=none TASK={cfg.task.name} ...) or give its best.ckpt in the method's checkpoint key"
        )
    say("training the unpruned baseline (method=none) once for " + " ".join(f"{k}={v}" for k, v in key.items()))
    paths = [
        override(k, v)
        for k, v in flat_params(cfg).items()
        if k.startswith(NEUTRAL) and not k.startswith("mlflow.run_name")
    ]
    base_cfg = compose(["method=none", *(f"{g}={cfg[g].name}" for g in GROUPS), f"seed={cfg.seed}", *extra, *paths])
    result = train(base_cfg, tags=baseline_tags(base_cfg))
    return client.get_run(result.run_id)
