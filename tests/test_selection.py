"""Which validation is a run's result: the method's rule, for the checkpoint and best/* alike."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from tokprune.config import compose
from tokprune.methods import rebuild
from tokprune.methods.base import PruningModule
from tokprune.methods.selection import select
from tokprune.training import train as train_module

ACC = "val/accuracy"


def v(acc, flops):
    return {ACC: acc, "val/flops_ratio_real": flops}


def test_best_metric_takes_the_best_and_the_earliest_of_ties():
    history = [v(0.8, 1.0), v(0.9, 1.0), v(0.9, 1.0), v(0.7, 1.0)]
    assert select("best_metric", history, ACC).index == 1


def test_last_ignores_an_earlier_epoch_that_only_pruned_less():
    history = [v(0.82, 1.08), v(0.72, 0.75)]
    assert select("last", history, ACC).index == 1


def test_best_meeting_constraint_and_the_fallback_to_the_last():
    meets = lambda val: val["val/flops_ratio_real"] <= 0.5
    chosen = select("best_meeting_constraint", [v(0.9, 0.9), v(0.8, 0.5), v(0.85, 0.45), v(0.95, 0.7)], ACC, meets)
    assert chosen.index == 2 and chosen.met_constraint is True and chosen.note == ""
    none_met = select("best_meeting_constraint", [v(0.9, 0.9), v(0.8, 0.7)], ACC, meets)
    assert none_met.index == 1 and none_met.met_constraint is False and "last" in none_met.note


@pytest.mark.parametrize("rule", ["best_metric", "last"])
def test_every_rule_picks_its_previous_choice_or_the_newest(rule):
    """What lets the checkpoint callback save only when the newest validation is picked."""
    g = torch.Generator().manual_seed(0)
    history = [v(float(a), 1.0) for a in torch.rand(12, generator=g)]
    previous = None
    for n in range(1, len(history) + 1):
        index = select(rule, history[:n], ACC).index
        assert index in (previous, n - 1)
        previous = index


class ScriptedModule(PruningModule):
    """Validation accuracy falls while it pretends to prune more: epoch 0 is the 'best'."""

    accuracies = [0.9, 0.5]

    def on_validation_epoch_end(self):
        self.val_metrics.reset()
        self.log("val/accuracy", self.accuracies[self.current_epoch])
        with torch.no_grad():  # a weight that tells the epochs' checkpoints apart
            self.classifier.bias.fill_(float(self.current_epoch))


@pytest.mark.slow
@pytest.mark.parametrize("rule, epoch", [("last", 1), ("best_metric", 0)])
def test_the_kept_checkpoint_and_best_metrics_follow_the_rule(rule, epoch, glue_dir, mlflow_uri, tmp_path, monkeypatch):
    class Module(ScriptedModule):
        selection_rule = rule

    monkeypatch.setattr(train_module, "build_method", lambda cfg, bert, task: Module(cfg, bert, task))
    cfg = compose(
        [
            "model=tiny",
            "budget=smoke",
            "train.epochs=2",
            "train.max_steps=-1",
            "data.train_subset=32",
            f"data.glue_dir={glue_dir}",
            f"mlflow.tracking_uri={mlflow_uri}",
            f"train.checkpoint_dir={tmp_path}",
        ]
    )
    result = train_module.train(cfg)
    assert result.best[ACC] == pytest.approx(Module.accuracies[epoch]) and result.selection.rule == rule
    contents = torch.load(result.checkpoint, weights_only=True)
    assert contents["tokprune"]["selected"]["epoch"] == epoch
    assert torch.all(contents["state_dict"]["classifier.bias"] == epoch)
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.data.metrics["best/accuracy"] == pytest.approx(Module.accuracies[epoch])
    assert run.data.metrics["selection/epoch"] == epoch and run.data.tags["selection_rule"] == rule
    described, rebuilt = rebuild(result.checkpoint)  # the file alone rebuilds the model
    assert described.run_id == result.run_id and described.cfg.model.name == "tiny"
    assert torch.all(rebuilt.classifier.bias == epoch)
