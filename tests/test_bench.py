"""The benchmark script runs end to end and writes its JSON and plot (tiny model: the
numbers themselves are only meaningful from `make bench` on the real backbone)."""

import json

import pytest
import torch

from tokprune.bench import KeepSchedule, run_bench, summary
from tokprune.config import compose
from tokprune.encoder import PrunableEncoder

from conftest import random_batch, tiny_bert


def test_keep_schedule_keeps_the_fraction_of_real_tokens_from_its_layer():
    bert = tiny_bert(layers=3)
    batch = random_batch(batch=4, length=20)
    out = PrunableEncoder(bert).eval()(batch["input_ids"], batch["attention_mask"],
                                       pruner=KeepSchedule({1: 0.5, 2: 0.25}), hard=True)
    lengths = batch["attention_mask"].sum(1)
    assert torch.equal(out.kept_counts()[0], lengths)
    assert torch.equal(out.kept_counts()[1], torch.ceil(lengths * 0.5).long())
    assert torch.equal(out.kept_counts()[2], torch.ceil(lengths * 0.25).long())


@pytest.mark.slow
def test_bench_writes_json_and_plot(glue_dir, tmp_path):
    cfg = compose(["model=tiny", "budget=smoke", f"data.glue_dir={glue_dir}"])
    results = run_bench(cfg, tmp_path, schedule={1: 0.5}, examples=16, steps_per_block=2, rounds=1)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert saved["speedup"] == results["speedup"]
    assert {(r["task"], r["batch_size"]) for r in saved["speedup"]} == {("sst2", 1), ("sst2", 32), ("mrpc", 1), ("mrpc", 32)}
    for row in saved["speedup"]:
        assert 1.2 < row["flops_reduction"] < 2.0  # half the tokens from layer 1 of 2
        assert row["flops_ratio_real"] == pytest.approx(1 / row["flops_reduction"])
    assert saved["callback_overhead"]["ratio_on_over_off"] > 0
    assert "callback overhead" in summary(saved)
