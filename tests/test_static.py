"""method=static: a fixed top-k schedule by received attention on the baseline's weights."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tokprune.config import compose
from tokprune.core.data import get_task
from tokprune.core.encoder import PrunableEncoder
from tokprune.methods import build_method
from tokprune.methods.static import TopKSchedule
from tokprune.training.train import train

from conftest import random_batch, tiny_bert


def test_geometric_schedule_reaches_keep_last_at_the_last_layer():
    schedule = TopKSchedule.geometric(6, first_pruned_layer=2, keep_last=0.25)
    assert sorted(schedule.fractions) == [2, 3, 4, 5]
    assert schedule.fractions[5] == pytest.approx(0.25)
    assert schedule.fractions[2] == pytest.approx(0.25**0.25)
    values = [schedule.fractions[l] for l in range(2, 6)]
    assert values == sorted(values, reverse=True)


def test_keeps_the_scheduled_share_of_real_tokens_and_equals_soft_mode():
    bert = tiny_bert(layers=3)
    batch = random_batch(batch=4, length=20)
    encoder = PrunableEncoder(bert).eval()
    pruner = TopKSchedule({1: 0.5, 2: 0.25})
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    hard = encoder(*args, pruner=pruner, hard=True)
    soft = encoder(*args, pruner=pruner, hard=False)
    lengths = batch["attention_mask"].sum(1)
    assert torch.equal(hard.kept_counts()[1], torch.ceil(lengths * 0.5).long())
    assert torch.equal(hard.kept_counts()[2], torch.ceil(lengths * 0.25).long())
    assert torch.equal(hard.kept_counts(), soft.kept_counts())
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hard.hidden[real], soft.hidden[real], atol=1e-4, rtol=0)


def test_keeps_cls_and_the_most_attended_tokens():
    from tokprune.core.encoder import PruneContext

    received = torch.tensor([[0.0, 0.1, 0.5, 0.3, 0.1]])
    probs = received[:, None, None, :].expand(1, 2, 5, 5).clone()
    keep = torch.ones(1, 5)
    mask = TopKSchedule({1: 0.6})(PruneContext(1, torch.zeros(1, 5, 4), keep, probs, keep))
    assert mask.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0]]  # ceil(0.6 * 5) = 3: [CLS], then tokens 2 and 3


def test_bad_first_pruned_layer_is_a_usage_error():
    from tokprune.errors import UsageError

    cfg = compose(["method=static", "model=tiny", "method.first_pruned_layer=2"])
    with pytest.raises(UsageError, match="first_pruned_layer"):
        build_method(cfg, tiny_bert(layers=2), get_task("sst2"))


@pytest.mark.slow
def test_without_finetuning_a_run_is_one_evaluation_of_the_baseline(glue_dir, mlflow_uri, tmp_path):
    """protocol=paper: the baseline is found (here: trained once) and evaluated under the schedule;
    no step is trained."""
    common = [
        "protocol=paper",
        "model=tiny",
        "budget=smoke",
        f"data.glue_dir={glue_dir}",
        f"mlflow.tracking_uri={mlflow_uri}",
        f"train.checkpoint_dir={tmp_path}",
    ]
    result = train(compose(["method=static", "method.first_pruned_layer=1", "method.keep_last=0.3", *common]))
    assert result.steps == 0 and result.best["val/flops_ratio_real"] < 0.9
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["method"] for r in runs) == ["none", "static"]
    again = train(compose(["method=static", "method.first_pruned_layer=1", "method.keep_last=0.6", *common]))
    assert again.best["val/flops_ratio_real"] > result.best["val/flops_ratio_real"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["method"] for r in runs) == ["none", "static", "static"]  # the baseline reused


@pytest.mark.slow
def test_a_plain_unpruned_run_is_the_baseline_later_runs_find(glue_dir, mlflow_uri, tmp_path):
    common = [
        "model=tiny",
        "budget=smoke",
        f"data.glue_dir={glue_dir}",
        f"mlflow.tracking_uri={mlflow_uri}",
        f"train.checkpoint_dir={tmp_path}",
    ]
    baseline = train(compose(["method=none", *common]))
    other_seed = train(compose(["method=none", "seed=7", *common]))
    static = train(compose(["method=static", "method.first_pruned_layer=1", *common]))
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["method"] for r in runs) == ["none", "none", "static"]  # no baseline trained
    params = client.get_run(static.run_id).data.params  # protocol=shared: the start (and teacher) key
    assert params["protocol.baseline_checkpoint"] == str(Path(baseline.checkpoint).resolve()) != other_seed.checkpoint
    assert static.steps > 0  # fine-tuned under the schedule that meets the target
