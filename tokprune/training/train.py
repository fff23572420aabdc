"""One training run: config -> data -> method -> Trainer (+ callbacks) -> MLflow."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from tokprune.core.backbone import load_bert, load_tokenizer
from tokprune.core.data import GlueDataModule, get_task
from tokprune.methods import build_method
from tokprune.methods.checkpoint import describe
from tokprune.methods.selection import RULES, Selected
from tokprune.training.baseline import baseline_tags, find_or_train
from tokprune.training.callbacks import TokenPruningCallback
from tokprune.training.tracking import log_training_data, make_logger, mark_failed, resolve_tracking_uri


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
    best: dict[str, float]  # validation metrics of the selected validation (the kept checkpoint)
    selection: Selected | None
    checkpoint: str
    train_rows: int
    eval_rows: int
    epochs: int
    steps: int
    seconds: float
    global_rank: int = 0  # under DDP every process returns a result; rank 0's is the one to report


class SelectedCheckpoint(L.Callback):
    """Every validation's ``val/`` values, the method's choice among them, and its checkpoint.

    After each validation the method's selection rule (``PruningModule.select``) picks the
    run's result; when it picks the newest validation, the weights are saved with the
    run's self-description (``checkpoint.describe``), so the file always holds the selected
    validation's model.

    The file is ``<checkpoint_dir>/<MLflow run id>/best.ckpt``. Under DDP only rank 0 has an
    MLflow run (the logger is rank-zero only), so the run id is broadcast from rank 0 in
    ``setup``, once the processes are connected: every process then knows the same run and
    file. Every process selects alike (the ``val/`` values it sees are the whole dev set's);
    rank 0 writes the file.
    """

    def __init__(self, checkpoint_dir: str | Path, description: dict):
        self.checkpoint_dir, self.description = Path(checkpoint_dir), description
        self.run_id: str | None = None
        self.validations: list[dict[str, float]] = []
        self.selected: Selected | None = None
        self.tables: dict[str, str] = {}  # the method's state tables at the selected validation

    @property
    def path(self) -> Path:
        return self.checkpoint_dir / str(self.run_id) / "best.ckpt"

    def setup(self, trainer, pl_module, stage):
        self.run_id = trainer.strategy.broadcast(trainer.logger.run_id)
        self.description = {**self.description, "run_id": self.run_id}

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        values = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        self.validations.append(values | {"epoch": trainer.current_epoch, "step": trainer.global_step})
        self.selected = pl_module.select(self.validations)
        if self.selected.index == len(self.validations) - 1:
            selected = {
                "rule": self.selected.rule,
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "metrics": values,
            }
            checkpoint = {
                "state_dict": pl_module.state_dict(),
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "tokprune": {**self.description, "selected": selected},
            }
            trainer.strategy.save_checkpoint(checkpoint, self.path)  # rank 0 only
            self.tables = pl_module.state_tables()
        trainer.strategy.barrier("SelectedCheckpoint")  # the file is there for every process before it goes on

    def best(self) -> dict[str, float]:
        """The selected validation's ``val/`` values."""
        if self.selected is None:
            return {}
        return {k: v for k, v in self.validations[self.selected.index].items() if k.startswith("val/")}


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
    """Fine-tune ``cfg.method`` on ``cfg.task`` and log everything to MLflow.

    Bad data or files fail before the MLflow run opens; once it is open, any exception marks
    it FAILED before propagating, so no run is left RUNNING.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = get_task(cfg.task.name)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("fit")  # fail on bad data before a model loads or an MLflow run opens
    module = build_method(cfg, load_bert(cfg.model), task)
    key = module.baseline_checkpoint_key
    if key and not OmegaConf.select(cfg, key):  # e.g. ToP's teacher: the baseline run's checkpoint
        OmegaConf.update(cfg, key, find_or_train(cfg, train).data.tags["checkpoint"])
        print(f"{key}={OmegaConf.select(cfg, key)} (the unpruned baseline's)")
    module.prepare_fit(datamodule)  # initial weights, a teacher: their errors come before the run opens too
    if tags is None and cfg.method.name == "none":  # a plain unpruned run: the baseline later runs find
        tags = baseline_tags(cfg)
    logger = make_logger(cfg, tags)
    try:
        return _fit(cfg, task, tokenizer, datamodule, module, logger, callbacks or [])
    except BaseException:
        mark_failed(logger)
        raise


def _fit(cfg, task, tokenizer, datamodule, module, logger, callbacks) -> RunResult:
    """Under DDP every process runs this; MLflow calls are no-ops on ranks other than 0."""
    selected = SelectedCheckpoint(cfg.train.checkpoint_dir, describe(cfg, module.encoder.config, tokenizer, None))
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        strategy=cfg.train.strategy,
        precision=cfg.train.precision,
        deterministic=cfg.train.deterministic,
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        gradient_clip_val=cfg.train.gradient_clip_val,
        val_check_interval=cfg.train.val_check_interval,
        limit_val_batches=cfg.train.limit_val_batches,
        log_every_n_steps=cfg.train.log_every_n_steps,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[TokenPruningCallback(cfg.task.max_length), selected, *callbacks],
        default_root_dir=cfg.train.checkpoint_dir,
    )
    start = time.perf_counter()
    if module.trains:
        trainer.fit(module, datamodule=datamodule)
    else:  # one evaluation of the loaded weights: the run's only validation
        trainer.validate(module, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - start
    best, choice, path = selected.best(), selected.selected, selected.path
    main = best.get(f"val/{task.main_metric}")
    logger.log_metrics(
        {k.replace("val/", "best/"): v for k, v in best.items()}
        | {"time/fit_seconds": seconds}
        | ({"best/main": main} if main is not None else {})
    )  # one column for every task's metric
    log_training_data(logger, cfg, datamodule.size("train"), datamodule.size("dev"))
    if choice is not None:
        chosen = selected.validations[choice.index]
        logger.log_metrics({"selection/epoch": chosen["epoch"], "selection/step": chosen["step"]})
        logger.experiment.set_tag(logger.run_id, "selection_rule", choice.rule)
        logger.experiment.set_tag(
            logger.run_id, "selection", RULES[choice.rule] + (f"; {choice.note}" if choice.note else "")
        )
        if choice.met_constraint is not None:
            logger.log_metrics({"selection/met_constraint": float(choice.met_constraint)})
    for name, text in selected.tables.items():
        logger.experiment.log_text(logger.run_id, text, f"method/{name}")
    if path.is_file():
        logger.experiment.set_tag(logger.run_id, "checkpoint", str(path.resolve()))
    logger.finalize("success")
    return RunResult(
        run_id=selected.run_id,
        tracking_uri=resolve_tracking_uri(cfg.mlflow.tracking_uri),
        best=best,
        selection=choice,
        checkpoint=str(path) if path.is_file() else "",
        train_rows=datamodule.size("train"),
        eval_rows=datamodule.size("dev"),
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        seconds=seconds,
        global_rank=trainer.global_rank,
    )
