"""The LightningModule every method shares: task head, task loss, metrics, optimiser.

A method subclasses it and may supply:

- ``build_pruner()``: its ``encoder.Pruner`` (default: keep everything);
- ``losses()``: *all* its loss terms by name (default: the task loss alone); a method may
  add terms or replace the task loss (ToP trains on a teacher's logits, not the labels);
- ``selection_rule`` / ``meets_constraint()``: which validation is the run's result
  (``tokprune.selection``);
- ``reference_soft_rule``: the paper's own training rule, used with
  ``method.train_attention=reference`` (default: the encoder's hard-equivalent rule);
- ``prepare_fit()``: what training needs from other files (initial weights, a teacher),
  done before fitting and never when a checkpoint is rebuilt for inference.

Nothing here knows MLflow or FLOPs: the Trainer's logger and the token-pruning callback see
what ``training_step``/``validation_step`` return.
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
from tokprune.selection import Selected, Validation, select


class PruningModule(L.LightningModule):
    """Sequence classification/regression on the prunable encoder."""

    #: which validation is the run's result; pruning methods must not pick an epoch for pruning less
    selection_rule = "last"
    #: the soft rule of the method's paper (a key of encoder.SOFT_RULES), if it differs from ours
    reference_soft_rule: str | None = None

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

    def losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """Every term of the training loss by name; their sum is minimised, each is logged."""
        return {"task_loss": self.task_loss(logits, batch["labels"])}

    def meets_constraint(self, validation: Validation) -> bool:
        """For ``selection_rule = "best_meeting_constraint"``: whether a validation counts."""
        raise NotImplementedError(f"{type(self).__name__} has no constraint")

    def prepare_fit(self) -> None:
        """Load what training needs from other files (not done when rebuilding a checkpoint)."""

    # -- shared -----------------------------------------------------------------------

    @property
    def soft_rule(self) -> str:
        """The encoder's soft rule this method trains with (``method.train_attention``)."""
        if self.cfg.method.get("train_attention", "renormalised") == "reference" and self.reference_soft_rule:
            return self.reference_soft_rule
        return "renormalised"

    def select(self, validations: list[Validation]) -> Selected:
        meets = self.meets_constraint if self.selection_rule == "best_meeting_constraint" else None
        return select(self.selection_rule, validations, f"val/{self.task.main_metric}", meets)

    def forward(self, batch: dict, hard: bool | None = None) -> tuple[Tensor, EncoderOutput]:
        out = self.encoder(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            pruner=self.pruner,
            hard=hard,
            soft_rule=self.soft_rule,
        )
        logits = self.classifier(self.dropout(self.pooler(out.hidden)))
        return logits, out

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: dict, batch_idx: int):
        logits, out = self(batch)
        terms = self.losses(logits, out, batch)
        loss = sum(terms.values())
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
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
