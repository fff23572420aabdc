"""The LightningModule every method shares: task head, task loss, metrics, optimiser.

A method subclasses it and supplies two things: ``build_pruner()`` (an
``encoder.Pruner``) and ``pruning_loss()`` (its regularizer terms, by name). Nothing here
knows MLflow or FLOPs: the Trainer's logger and the token-pruning callback see what
``training_step``/``validation_step`` return.
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import BertModel, get_linear_schedule_with_warmup
from transformers.models.bert.modeling_bert import BertPooler

from tokprune.data import GlueTask, build_metrics, metric_inputs
from tokprune.encoder import EncoderOutput, KeepAll, PrunableEncoder, Pruner


class PruningModule(L.LightningModule):
    """Sequence classification/regression on the prunable encoder."""

    #: how soft (training) mode hides dropped tokens from attention; see PrunableEncoder
    key_mask = "pre_softmax"

    def __init__(self, cfg: DictConfig, bert: BertModel, task: GlueTask):
        super().__init__()
        self.cfg, self.task = cfg, task
        self.encoder = PrunableEncoder(bert)
        config = bert.config
        self.pooler = bert.pooler if bert.pooler is not None else BertPooler(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, task.num_labels)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)
        self.pruner = self.build_pruner()
        self.val_metrics = build_metrics(task).clone(prefix="val/")
        self.train()  # from_pretrained leaves modules in eval mode (dropout off)

    # -- what a method overrides ------------------------------------------------------

    def build_pruner(self) -> Pruner:
        return KeepAll()

    def pruning_loss(self, out: EncoderOutput, batch: dict, logits: Tensor) -> dict[str, Tensor]:
        """The method's regularizer terms, added to the task loss; logged by name."""
        return {}

    # -- shared -----------------------------------------------------------------------

    def forward(self, batch: dict) -> tuple[Tensor, EncoderOutput]:
        out = self.encoder(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            pruner=self.pruner,
            key_mask=self.key_mask,
        )
        logits = self.classifier(self.dropout(self.pooler(out.hidden)))
        return logits, out

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: dict, batch_idx: int):
        logits, out = self(batch)
        task_loss = self.task_loss(logits, batch["labels"])
        terms = self.pruning_loss(out, batch, logits)
        loss = task_loss + sum(terms.values())
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if terms:
            self.log("train/task_loss", task_loss, batch_size=size)
            self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=size)
        return {"loss": loss, "encoder": out}

    def validation_step(self, batch: dict, batch_idx: int):
        logits, out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", self.task_loss(logits, batch["labels"]), batch_size=size)
        self.val_metrics.update(metric_inputs(self.task, logits), batch["labels"])
        return {"encoder": out}

    def on_validation_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        self.log_dict(values)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: no weight decay on biases and LayerNorm weights."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.cfg.train.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.cfg.train.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
