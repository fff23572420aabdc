"""The LightningModule every method shares: task head, losses, metrics, optimiser, and the
training protocol (``methods.protocol``) every learned method runs under.

A method subclasses it and may supply:

- ``build_pruner()``: its ``encoder.Pruner`` (default: keep everything);
- ``pruning_losses()``: its own regularizers by name (the gate's bi-modal term, Transkimmer's skim
  loss); ``prediction_losses()`` when its paper replaces the task loss (ToP's distillation);
- ``expected_kept()``: the expected tokens each layer computes, from its soft decisions, which
  the shared FLOPs target holds (default: the sum of the soft masks);
- ``own_flops_target()``: the target its paper holds under ``protocol=paper`` (ToP's);
- ``init_checkpoint()`` / ``teacher_checkpoint()`` under ``protocol=paper`` (its paper's start
  and teacher), ``learns_decisions`` (False: nothing to hold a target with);
- ``reference_soft_rule``: the paper's own training rule, used with
  ``method.train_attention=reference`` (default: the encoder's hard-equivalent rule);
- ``prepare_fit()``: what training needs from other files (initial weights, a teacher),
  done before fitting and never when a checkpoint is rebuilt for inference.

Loss = ``prediction_losses`` (task loss; under a teacher ``(1 - w) * task + w * KD``) +
``pruning_losses`` + the FLOPs constraint when a target is held (``flops_target``).
Nothing here knows MLflow: the Trainer's logger and the token-pruning callback see what
``training_step``/``validation_step`` return.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertPooler

from tokprune.core.data import GlueTask, build_metrics, get_task, metric_inputs
from tokprune.core.encoder import EncoderOutput, KeepAll, PrunableEncoder, Pruner
from tokprune.core.flops import FlopsCounter
from tokprune.errors import UsageError
from tokprune.methods import constraints
from tokprune.methods.checkpoint import FrozenReference, check_same_setting, load_weights, read_described, restore
from tokprune.methods.distill import prediction_distillation
from tokprune.methods.protocol import FlopsTarget, TeacherBatch, TeacherOutputs, is_shared
from tokprune.methods.selection import Selected, Validation, select

BASELINE_KEY = "protocol.baseline_checkpoint"


class PruningModule(L.LightningModule):
    """Sequence classification/regression on the prunable encoder."""

    #: which validation is the run's result when no FLOPs target is held (with one: the best
    #: validation meeting it); pruning methods must not pick an epoch for pruning less
    untargeted_selection_rule = "last"
    #: the soft rule of the method's paper (a key of encoder.SOFT_RULES), if it differs from ours
    reference_soft_rule: str | None = None
    #: whether the training protocol applies (False: ``none``, which prunes nothing)
    follows_protocol = False
    #: whether the method learns its decisions (False: a fixed schedule holds no target)
    learns_decisions = False
    #: whether it distils from a teacher whatever ``protocol.distill_weight`` says (ToP)
    needs_teacher = False
    #: protocol=paper: config keys of the paper's initial weights and teacher (None: none), and the
    #: key that, left empty, gets the unpruned baseline's checkpoint of the same task, model, budget
    #: and seed (found in the MLflow store or trained first: tokprune.training.baseline)
    paper_init_key: str | None = None
    paper_teacher_key: str | None = None
    paper_baseline_checkpoint_key: str | None = None

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
        with warnings.catch_warnings():  # STS-B's Spearman keeps its inputs: a dev set's worth, nothing to act on
            warnings.filterwarnings("ignore", message=r"Metric `SpearmanCorrcoef` will save all targets")
            self.val_metrics = build_metrics(task).clone(prefix="val/")
        self.shared = self.follows_protocol and is_shared(cfg)
        self.flops_target = self.build_flops_target()
        if self.flops_target is not None and self.flops_target.constraint == "lagrangian":
            self.multipliers = constraints.multipliers()  # lambda1, lambda2 of the FLOPs constraint
        self.teacher: TeacherOutputs | None = None
        self._flops_model: FlopsCounter | None = None
        self.train()  # from_pretrained leaves modules in eval mode (dropout off)

    # -- what a method overrides ------------------------------------------------------

    def build_pruner(self) -> Pruner:
        return KeepAll()

    def pruning_losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """The method's own regularizers by name (none by default)."""
        return {}

    def own_flops_target(self) -> FlopsTarget | None:
        """The FLOPs target the method's paper holds under ``protocol=paper`` (None: none)."""
        return None

    def loss_attention_layers(self) -> tuple[int, ...]:
        """Layers whose attention probabilities the losses read (ToP's ranking distillation)."""
        return ()

    def expected_kept(self, out: EncoderOutput) -> Tensor:
        """L x B expected tokens each layer computes, from the training forward's soft decisions
        (default: the soft masks summed; for binary masks, the counts hard mode computes)."""
        return torch.stack([keep.sum(1) for keep in out.keep])

    def state_tables(self) -> dict[str, str]:
        """Small text tables of the method's learned state (file name -> TSV), logged as
        artifacts for the selected validation; the method never touches MLflow itself."""
        return {}

    @property
    def trains(self) -> bool:
        """False: a run is one evaluation of the weights as loaded (a fixed schedule, say)."""
        return True

    # -- the protocol: start, teacher, target ---------------------------------------------

    def build_flops_target(self) -> FlopsTarget | None:
        if self.shared:
            return FlopsTarget.of_protocol(self.cfg) if self.learns_decisions else None
        return self.own_flops_target()

    @property
    def baseline_checkpoint_key(self) -> str | None:
        """A config key that, left empty, gets the unpruned baseline's checkpoint (``train``)."""
        return BASELINE_KEY if self.shared else self.paper_baseline_checkpoint_key

    @property
    def init_key(self) -> str | None:
        return BASELINE_KEY if self.shared else self.paper_init_key

    @property
    def teacher_key(self) -> str | None:
        if self.shared:
            return BASELINE_KEY if self.needs_teacher or self.cfg.protocol.distill_weight > 0 else None
        return self.paper_teacher_key

    def distillation(self) -> tuple[float, float] | None:
        """(weight w, temperature) of ``(1 - w) * task + w * KD``, or None: labels only."""
        if self.shared and self.teacher_key:
            return float(self.cfg.protocol.distill_weight), float(self.cfg.protocol.temperature)
        return None

    def prepare_fit(self, datamodule=None) -> None:
        """Load what training needs from other files (not done when rebuilding a checkpoint): the
        initial weights (a method's own parameters keep their init) and the teacher, whose outputs
        per training row are computed once when ``datamodule`` is given (``protocol.teacher_cache``)."""
        if self.init_key:
            path = OmegaConf.select(self.cfg, self.init_key)
            if not path and self.shared:
                raise UsageError(
                    f"protocol=shared starts method={self.cfg.method.name} from the fine-tuned baseline: "
                    f"set {BASELINE_KEY}=<best.ckpt of a method=none run> of the same task and model "
                    "(train and sweep fill it with the baseline run's, found in the MLflow store or trained once)"
                )
            if path:
                load_weights(self, path, self.init_key, skip=("pruner.", "multipliers"))
        if self.teacher_key:
            teacher = TeacherOutputs(
                load_teacher(OmegaConf.select(self.cfg, self.teacher_key), self.cfg, self.teacher_key)
            )
            if datamodule is not None and self.cfg.get("protocol", {}).get("teacher_cache", True):
                teacher.build_cache(
                    datamodule.splits["train"], datamodule.collate, datamodule.eval_batch_size, datamodule.max_length
                )
            self.teacher = teacher

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def teacher_outputs(self, batch: dict) -> TeacherBatch:
        if self.teacher is None:
            raise RuntimeError(
                f"method={self.cfg.method.name} distils from a teacher but none is loaded: "
                "call prepare_fit() before training"
            )
        return self.teacher(batch)

    def flops_model(self) -> FlopsCounter:
        """The fvcore per-layer costs the FLOPs callback measures with (traced on first use)."""
        if self._flops_model is None:
            self._flops_model = FlopsCounter(self.encoder, self.pruner)
        return self._flops_model

    def expected_flops_ratio(self, out: EncoderOutput) -> Tensor:
        """The batch's expected FLOPs ratio at real length, differentiable in the soft decisions."""
        return self.flops_model().expected_ratio(self.expected_kept(out), out.lengths)

    def flops_ramp(self) -> float:
        """0 at the first step, 1 once the target has ramped in."""
        return constraints.linear_ramp(self.progress, self.flops_target.warmup)

    def flops_constraint(self, out: EncoderOutput) -> Tensor:
        """``lambda1 * gap + lambda2 * gap^2`` (multipliers ascending) or ``weight * gap^2``, with
        ``gap = target - expected ratio`` (the expected sparsity minus the target's: ToP's sign)."""
        target, expected = self.flops_target, self.expected_flops_ratio(out)
        ramped = target.at(self.flops_ramp())
        gap = ramped - expected
        values = {"expected_flops_ratio": expected, "target_flops_ratio": ramped}
        if target.constraint == "lagrangian":
            penalty = constraints.lagrangian(gap, self.multipliers)
            values.update(lambda1=self.multipliers[0], lambda2=self.multipliers[1])
        else:
            penalty = target.weight * gap**2
        constraints.log_train(self, values, len(out.lengths))
        return penalty

    @property
    def selection_rule(self) -> str:
        return "best_meeting_constraint" if self.flops_target is not None else self.untargeted_selection_rule

    def meets_constraint(self, validation: Validation) -> bool:
        """Whether a validation's measured FLOPs ratio at real length meets the target (+ epsilon)."""
        if self.flops_target is None:
            raise NotImplementedError(f"{type(self).__name__} holds no FLOPs target")
        ratio = validation.get("val/flops_ratio_real")
        return ratio is not None and ratio <= self.flops_target.ratio + self.flops_target.epsilon

    # -- shared -----------------------------------------------------------------------

    @property
    def soft_rule(self) -> str:
        """The encoder's soft rule this method trains with (``method.train_attention``); in the hard
        phase always the hard-equivalent one (a paper's rule would not compute what removal does)."""
        reference = self.cfg.method.get("train_attention", "renormalised") == "reference"
        if reference and self.reference_soft_rule and not self.decisions_frozen():
            return self.reference_soft_rule
        return "renormalised"

    def select(self, validations: list[Validation]) -> Selected:
        meets = self.meets_constraint if self.selection_rule == "best_meeting_constraint" else None
        return select(self.selection_rule, validations, f"val/{self.task.main_metric}", meets)

    def forward(
        self, batch: dict, hard: bool | None = None, attentions: tuple[int, ...] = ()
    ) -> tuple[Tensor, EncoderOutput]:
        """Logits and the encoder's output; ``attentions``: layers whose probabilities the caller reads
        (besides the pruner's and, in training, the losses': ``loss_attention_layers``)."""
        wanted = (*attentions, *(self.loss_attention_layers() if self.training else ()))
        frozen = self.training and self.pruner.training and self.decisions_frozen()
        if frozen:
            self.pruner.eval()  # its evaluation decisions: binary, so the soft rule equals removal
        try:
            out = self.encoder(
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("token_type_ids"),
                pruner=self.pruner,
                hard=hard,
                soft_rule=self.soft_rule,
                output_attentions=wanted,  # the others may run fused attention
                output="cls",  # the head reads [CLS] only: hard mode scatters nothing back
            )
        finally:
            if frozen:
                self.pruner.train()
        logits = self.classifier(self.dropout(self.pooler(out.hidden)))
        return logits, out

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def prediction_losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """The task loss; with a teacher, ``(1 - w) * task`` and ``w * KD`` (``distillation()``)."""
        task = self.task_loss(logits, batch["labels"])
        settings = self.distillation()
        if settings is None:
            return {"task_loss": task}
        weight, temperature = settings
        teacher = self.teacher_outputs(batch)
        distill = prediction_distillation(logits, teacher.logits, temperature, self.task.is_regression)
        return {"task_loss": (1 - weight) * task, "distill_loss": weight * distill}

    def losses(self, logits: Tensor, out: EncoderOutput, batch: dict) -> dict[str, Tensor]:
        """Every term of the training loss by name; their sum is minimised, each is logged. With the
        decisions frozen (``protocol.hard_phase``) only the prediction losses: nothing to regularise."""
        terms = self.prediction_losses(logits, out, batch)
        if self.decisions_frozen():
            return terms
        terms.update(self.pruning_losses(logits, out, batch))
        if self.flops_target is not None:
            terms["flops_constraint"] = self.flops_constraint(out)
        return terms

    @property
    def hard_phase(self) -> float:
        """``protocol.hard_phase`` where it applies (protocol=shared, a method that learns its
        decisions), else 0."""
        return float(self.cfg.protocol.get("hard_phase", 0.0)) if self.shared and self.learns_decisions else 0.0

    def decisions_frozen(self) -> bool:
        """(ours) Whether training is in ``protocol.hard_phase``, its last fraction, where a learned
        method trains its weights under its evaluation decisions (LTP's second stage): the decision
        parameters are frozen (binary decisions pass no gradient), the constraint and the method's
        regularizers are off, and what is trained is what inference computes. The decisions still
        follow the weights (rankings read attention, Transkimmer's predictors hidden states), so the
        measured FLOPs may drift a little from the target; selection still checks it."""
        return self.hard_phase > 0 and self.progress >= 1.0 - self.hard_phase

    def training_step(self, batch: dict, batch_idx: int):
        logits, out = self(batch)
        terms = self.losses(logits, out, batch)
        loss = sum(terms.values())
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if self.hard_phase > 0:
            self.log("train/decisions_frozen", float(self.decisions_frozen()), batch_size=size)
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
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
        ]

    def unclipped_parameters(self) -> list[Tensor]:
        """Parameters left out of gradient clipping: the multipliers (their gradient is the
        constraint's gap) and a method's own (ToP's masks)."""
        return [self.multipliers] if hasattr(self, "multipliers") else []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        excluded = self.unclipped_parameters()
        if not excluded:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        constraints.clip_gradients_except(optimizer, excluded, gradient_clip_val, gradient_clip_algorithm)

    def parameter_groups(self) -> list[dict]:
        own = self.own_parameter_groups()
        if self.flops_target is not None and hasattr(self, "multipliers"):
            own = [*own, constraints.constant_group([self.multipliers], self.flops_target.multiplier_lr)]
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


def load_teacher(path: str, cfg: DictConfig, what: str) -> FrozenReference:
    """The unpruned (``method=none``) model in ``path``, frozen: the shared module itself, whose
    pruner keeps everything (no registry lookup: the registry imports this module). Same task and
    backbone as ``cfg``, or a one-line error."""
    described = read_described(path, what)
    method = described.cfg.method.name
    if method != "none":
        raise UsageError(f"{what} '{path}' is a method={method} run: the teacher must be unpruned (method=none)")
    check_same_setting(described, cfg, what)
    module = PruningModule(described.cfg, described.bert(), get_task(described.cfg.task.name))
    return FrozenReference(restore(described, module, what), Path(path))
