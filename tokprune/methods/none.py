"""``method=none``: plain fine-tuning with nothing pruned, the FLOPs-ratio-1.0 reference."""

from tokprune.methods.base import PruningModule


class Method(PruningModule):
    """The unpruned baseline: the shared module with its keep-everything pruner."""

    untargeted_selection_rule = "best_metric"  # nothing is pruned, so the best epoch costs no FLOPs
