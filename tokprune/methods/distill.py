"""Distillation from a frozen, fine-tuned unpruned model (the teacher), shared by ToP and
Transkimmer's ``method.teacher_checkpoint``.

The teacher is a ``checkpoint.FrozenReference``: loaded in ``prepare_fit`` (never when a
checkpoint is rebuilt for inference), always in eval mode and without gradients, outside the
student's state dict, optimiser and ``train()``/``eval()`` switches; the method moves it to its
device in ``on_fit_start``.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(teacher || student)`` of the temperature-softened distributions, times ``T^2``."""
    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.softmax(teacher / temperature, dim=-1),
            reduction="batchmean",
        )
        * temperature**2
    )


def prediction_distillation(student: Tensor, teacher: Tensor, temperature: float, regression: bool) -> Tensor:
    """Classification: ``logit_distillation``; regression: MSE to the teacher's prediction."""
    if regression:
        return F.mse_loss(student.squeeze(-1), teacher.squeeze(-1))
    return logit_distillation(student, teacher, temperature)
