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
from transformers import BertModel
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
    #: a config key that, left empty, gets the checkpoint of the unpruned baseline of the same
    #: task, model, budget and seed (found in the MLflow store or trained first: tokprune.baseline)
    baseline_checkpoint_key: str | None = None

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

    def state_tables(self) -> dict[str, str]:
        """Small text tables of the method's learned state (file name -> TSV), logged as
        artifacts for the selected validation; the method never touches MLflow itself."""
        return {}

    @property
    def trains(self) -> bool:
        """False: a run is one evaluation of the weights as loaded (a fixed schedule, say)."""
        return True

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
            output="cls",  # the head reads [CLS] only: hard mode scatters nothing back
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
        self.log("val/loss", self.task_loss(logits, batch["labels"]), batch_size=size, sync_dist=True)
        self.val_metrics.update(metric_inputs(self.task, logits), batch["labels"])
        return {"encoder": out}

    def on_validation_epoch_end(self) -> None:
        values = {k: float(v) for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        self.log_dict(values)

    @property
    def progress(self) -> float:
        """Fraction of training done (0 before the first step, 1 at the last): for schedules
        a method runs inside its losses (warm-ups, ramps, decays)."""
        try:
            total = self.trainer.estimated_stepping_batches
        except RuntimeError:  # not attached to a Trainer (unit tests)
            return 0.0
        return min(1.0, self.trainer.global_step / max(1.0, float(total)))

    def own_parameter_groups(self) -> list[dict]:
        """AdamW groups a method sets itself (own lr, no weight decay, ``constant_lr``); every
        parameter not in them gets the shared groups."""
        return []

    @staticmethod
    def decay_groups(params, weight_decay: float, **extra) -> list[dict]:
        """Weight decay on matrices only (not on biases and LayerNorm weights)."""
        params = [p for p in params if p.requires_grad]
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]

    def parameter_groups(self) -> list[dict]:
        own = self.own_parameter_groups()
        taken = {id(p) for group in own for p in group["params"]}
        shared = self.decay_groups((p for p in self.parameters() if id(p) not in taken), self.cfg.train.weight_decay)
        return [group for group in [*shared, *own] if group["params"]]

    def configure_optimizers(self):
        """AdamW, linear warm-up and decay; groups marked ``constant_lr`` keep their lr."""
        groups = self.parameter_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.cfg.train.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.cfg.train.warmup_ratio * total)

        def linear(step: int) -> float:
            if step < warmup:
                return step / max(1, warmup)
            return max(0.0, (total - step) / max(1, total - warmup))

        schedules = [(lambda step: 1.0) if g.get("constant_lr") else linear for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Projections a method applies after every optimiser step (clipping gates, clamping log-alphas)."""
