"""Which validation is a run's result: one rule per method, used for everything.

The checkpoint kept, the ``best/*`` metrics and a sweep trial's objective all come from the
validation the rule selects, so they cannot disagree. A pruning method must not report an
epoch only because it pruned less (its accuracy is then bought with FLOPs the final model
does not save), so the rules for pruning methods never compare metrics across validations
that prune differently, except among those meeting the method's own constraint.

Every rule picks either its previous choice or the newest validation, so a callback that
saves a checkpoint whenever the newest one is picked always holds the selected one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Validation = dict[str, float]

RULES = {
    "best_metric": "the validation with the best main metric (the unpruned baseline)",
    "last": "the last validation (pruning methods: what training converged to)",
    "best_meeting_constraint": "the best main metric among validations that meet the method's constraint; "
    "the last validation when none does",
}


@dataclass(frozen=True)
class Selected:
    index: int  # into the list of validations
    rule: str
    met_constraint: bool | None = None  # None: the rule has no constraint

    @property
    def note(self) -> str:
        if self.met_constraint is False:
            return "no validation met the method's constraint: the result is the last validation"
        return ""


def select(
    rule: str, validations: list[Validation], main_key: str, meets: Callable[[Validation], bool] | None = None
) -> Selected:
    """The selected validation under ``rule`` (a key of ``RULES``)."""
    if not validations:
        raise ValueError("no validation to select from")
    last = len(validations) - 1
    if rule == "last":
        return Selected(last, rule)
    if rule == "best_metric":
        # earliest of equal bests: a later equal validation adds nothing
        best = max(range(len(validations)), key=lambda i: (validations[i][main_key], -i))
        return Selected(best, rule)
    if rule == "best_meeting_constraint":
        if meets is None:
            raise ValueError("rule best_meeting_constraint needs a constraint")
        feasible = [i for i, v in enumerate(validations) if meets(v)]
        if not feasible:
            return Selected(last, rule, met_constraint=False)
        return Selected(max(feasible, key=lambda i: (validations[i][main_key], -i)), rule, met_constraint=True)
    raise ValueError(f"unknown selection rule {rule!r}: one of {', '.join(RULES)}")
