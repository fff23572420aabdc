"""MLflow plumbing: where the store is and the Lightning logger that writes to it."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from tokprune.config import flat_params


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute so every process finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def store_dir(uri: str) -> Path | None:
    """The folder of a SQLite store (artifacts, the sweep journal and reports go beside it);
    None for a tracking server."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]).parent if uri.startswith(prefix) else None


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (``mlartifacts/``); the server decides otherwise."""
    folder = store_dir(uri)
    return (folder / "mlartifacts").as_uri() if folder else None


def run_name(cfg: DictConfig) -> str:
    return cfg.mlflow.run_name or f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}-{cfg.budget.name}"


def make_logger(cfg: DictConfig, tags: dict[str, str] | None = None) -> MLFlowLogger:
    """An MLFlowLogger on the configured store, with the resolved config logged as params."""
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    base_tags = {
        "method": cfg.method.name,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "budget": cfg.budget.name,
    }
    logger = MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=run_name(cfg),
        tracking_uri=uri,
        tags={**base_tags, **(tags or {})},
        artifact_location=artifact_root(uri),
    )
    logger.log_hyperparams(flat_params(cfg))
    return logger
