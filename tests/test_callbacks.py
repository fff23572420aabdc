"""The token-pruning callback logs FLOPs and kept tokens per layer, without disturbing training."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from tokprune.config import compose
from tokprune.core.backbone import load_bert, load_tokenizer
from tokprune.core.data import get_task
from tokprune.core.encoder import Pruner
from tokprune.methods.base import PruningModule
from tokprune.training.callbacks import TokenPruningCallback
from tokprune.training.train import build_datamodule


class MemoryLogger(Logger):
    """Keeps every logged metric in a list, per step."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "memory", "0"

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def history(self, key):
        return [m[key] for _, m in self.rows if key in m]


class DropEveryOtherToken(Pruner):
    """A stand-in method: from layer 1 on, keep even positions only."""

    needs_attention = False

    def forward(self, ctx):
        if ctx.layer == 0:
            return ctx.keep
        keep = ctx.keep
        return (torch.arange(keep.shape[1], device=keep.device) % 2 == 0).to(keep.dtype).expand_as(keep)


class HalfPruned(PruningModule):
    def build_pruner(self):
        return DropEveryOtherToken()


def fit(glue_dir, module_class=PruningModule, with_callback=True, steps=4):
    cfg = compose(["model=tiny", "budget=smoke", f"data.glue_dir={glue_dir}", f"train.max_steps={steps}"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg, load_tokenizer(cfg.model))
    module = module_class(cfg, load_bert(cfg.model), get_task("sst2"))
    logger = MemoryLogger()
    callbacks = [TokenPruningCallback(cfg.task.max_length)] if with_callback else []
    trainer = L.Trainer(
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    trainer.fit(module, datamodule=datamodule)
    return logger


def test_logs_flops_and_kept_fraction_per_layer_every_step(glue_dir):
    logger = fit(glue_dir, HalfPruned)
    assert len(logger.history("train/flops")) == 4
    for prefix in ("train", "val"):
        ratio = logger.history(f"{prefix}/flops_ratio_real")
        assert ratio and all(0.2 < r < 1.0 for r in ratio)
        assert all(p < r for p, r in zip(logger.history(f"{prefix}/flops_ratio_padded"), ratio))
        assert logger.history(f"{prefix}/kept_fraction/layer_0")[-1] == pytest.approx(1.0)
        assert 0.4 < logger.history(f"{prefix}/kept_fraction/layer_1")[-1] < 0.7
        assert logger.history(f"{prefix}/flops/layer_1")[-1] < logger.history(f"{prefix}/flops/layer_0")[-1]


def test_unpruned_model_has_ratio_one(glue_dir):
    logger = fit(glue_dir, PruningModule)
    assert logger.history("val/flops_ratio_real")[-1] == pytest.approx(1.0)
    assert logger.history("val/kept_fraction/layer_1")[-1] == pytest.approx(1.0)


def test_counting_does_not_change_training(glue_dir):
    with_cb = fit(glue_dir, HalfPruned, with_callback=True)
    without = fit(glue_dir, HalfPruned, with_callback=False)
    assert with_cb.history("train/loss") == without.history("train/loss")
    assert with_cb.history("val/accuracy") == without.history("val/accuracy")
