"""A constraint held by a Lagrangian whose multipliers ascend, shared by the methods that hold a
measured quantity at a target: ToP (expected FLOPs sparsity) and Transkimmer's ``skim_target``
(kept fraction).

The penalty is ``lambda1 * gap + lambda2 * gap^2`` with ``gap = measured - target`` and both
multipliers 0 at the start (ToP's reference, ``l0_module.py``). Minimising the penalty moves the
model towards the target; the multipliers enter with a negated gradient (``2*lambda.detach() -
lambda``: same value, gradient flipped), so the same optimiser step *raises* the penalty through
them while the target is missed (gradient ascent). The reference uses AdamW with lr ``-reg_lr``,
which torch's AdamW refuses; with weight decay 0 the two updates are identical. The multipliers'
AdamW group has its own constant lr and no weight decay (``constant_group``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def multipliers() -> nn.Parameter:
    """``(lambda1, lambda2)``, both 0 at the start: the penalty is 0 until the target is missed."""
    return nn.Parameter(torch.zeros(2))


def lagrangian(gap: Tensor, lambdas: Tensor) -> Tensor:
    """``lambda1 * gap + lambda2 * gap^2``, the multipliers ascending (their gradient negated)."""
    ascending = 2 * lambdas.detach() - lambdas  # same value, gradient negated
    return ascending[0] * gap + ascending[1] * gap**2


def constant_group(params: Iterable[Tensor], lr: float) -> dict:
    """An AdamW group at a constant ``lr`` (no schedule), no weight decay: the multipliers' (and
    ToP's masks')."""
    return {"params": list(params), "lr": float(lr), "weight_decay": 0.0, "constant_lr": True}


def clip_gradients_except(
    optimizer, excluded: Iterable[Tensor], value: float | None, algorithm: str | None = None
) -> None:
    """Lightning's gradient clipping on every parameter but ``excluded`` (the multipliers, and ToP's
    masks): a multiplier's gradient is the constraint's gap, not part of the model's gradient norm."""
    if not value:
        return
    excluded = {id(p) for p in excluded}
    params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in excluded]
    if algorithm in (None, "norm"):
        torch.nn.utils.clip_grad_norm_(params, value)
    else:
        torch.nn.utils.clip_grad_value_(params, value)


def linear_ramp(progress: float, warmup: float) -> float:
    """``min(1, progress / warmup)``: 0 at the first step, 1 from ``warmup`` (a fraction of training)
    on; 1 throughout when ``warmup`` is 0."""
    return 1.0 if warmup <= 0 else min(1.0, progress / warmup)


def log_train(module, values: dict, size: int) -> None:
    """Log ``train/<name>`` for each value (the constraint's state); nothing outside a Trainer."""
    try:
        module.trainer  # noqa: B018 (raises when detached)
    except RuntimeError:  # not attached to a Trainer (unit tests)
        return
    module.log_dict({f"train/{k}": float(torch.as_tensor(v).detach()) for k, v in values.items()}, batch_size=size)
