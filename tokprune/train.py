"""One training run: config -> data -> method -> Trainer (+ callbacks) -> MLflow."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from tokprune.callbacks import TokenPruningCallback
from tokprune.backbone import load_bert, load_tokenizer
from tokprune.data import GlueDataModule, get_task
from tokprune.methods import build_method
from tokprune.tracking import make_logger


class _NoAdverts(logging.Filter):
    """Lightning advertises a cloud logger at every Trainer start: not news about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
# Lightning's own use of a torch pytree API it has not caught up with; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@dataclass
class RunResult:
    """What a finished run reports: enough for the CLI summary and for a sweep trial."""

    run_id: str
    tracking_uri: str
    best: dict[str, float]  # validation metrics of the best epoch (the kept checkpoint)
    checkpoint: str
    train_rows: int
    eval_rows: int
    epochs: int
    steps: int
    seconds: float


class ValidationHistory(L.Callback):
    """Every validation's logged ``val/`` values (the method's metrics and the callback's FLOPs)."""

    def __init__(self, main_metric: str):
        self.key = f"val/{main_metric}"
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.epochs.append({k: float(v) for k, v in metrics.items() if k.startswith("val/")})

    def best(self) -> dict[str, float]:
        """The validation with the best main metric: the one the checkpoint keeps."""
        return max(self.epochs, key=lambda v: v[self.key]) if self.epochs else {}


def build_datamodule(cfg: DictConfig, tokenizer) -> GlueDataModule:
    return GlueDataModule(
        task=get_task(cfg.task.name),
        tokenizer=tokenizer,
        max_length=cfg.task.max_length,
        glue_dir=cfg.data.glue_dir,
        hub_dataset=cfg.data.hub_dataset,
        train_subset=cfg.data.train_subset,
        eval_subset=cfg.data.eval_subset,
        batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
    )


def train(cfg: DictConfig, callbacks: list | None = None, tags: dict[str, str] | None = None) -> RunResult:
    """Fine-tune ``cfg.method`` on ``cfg.task`` and log everything to MLflow."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = get_task(cfg.task.name)
    datamodule = build_datamodule(cfg, load_tokenizer(cfg.model))
    datamodule.setup("fit")  # fail on bad data before a model loads or an MLflow run opens
    module = build_method(cfg, load_bert(cfg.model), task)
    logger = make_logger(cfg, tags)
    checkpoint = ModelCheckpoint(
        dirpath=Path(cfg.train.checkpoint_dir) / logger.run_id,
        filename="best",
        monitor=f"val/{task.main_metric}",
        mode="max",
        save_top_k=1,
        save_weights_only=True,
    )
    history = ValidationHistory(task.main_metric)
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        precision=cfg.train.precision,
        deterministic=cfg.train.deterministic,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        gradient_clip_val=cfg.train.gradient_clip_val,
        val_check_interval=cfg.train.val_check_interval,
        limit_val_batches=cfg.train.limit_val_batches,
        log_every_n_steps=cfg.train.log_every_n_steps,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[TokenPruningCallback(cfg.task.max_length), history, checkpoint, *(callbacks or [])],
        default_root_dir=cfg.train.checkpoint_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    best = history.best()
    logger.log_metrics({k.replace("val/", "best/"): v for k, v in best.items()} | {"time/fit_seconds": seconds})
    if checkpoint.best_model_path:
        logger.experiment.set_tag(logger.run_id, "checkpoint", str(Path(checkpoint.best_model_path).resolve()))
    logger.finalize("success")
    return RunResult(
        run_id=logger.run_id,
        tracking_uri=logger._tracking_uri,
        best=best,
        checkpoint=checkpoint.best_model_path,
        train_rows=datamodule.size("train"),
        eval_rows=datamodule.size("dev"),
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        seconds=seconds,
    )
