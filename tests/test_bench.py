"""The benchmark script runs end to end and writes its JSON and plots, the engines table
(transformers / ONNX Runtime, unpruned / pruned) included (tiny model: the numbers themselves are
only meaningful from `make bench` on the real backbone)."""

import json

import pytest
import torch

from tokprune.config import compose
from tokprune.core.backbone import load_tokenizer
from tokprune.core.encoder import PrunableEncoder
from tokprune.errors import UsageError
from tokprune.methods.static import TopKSchedule
from tokprune.reporting.bench import run_bench, summary

from conftest import random_batch, tiny_bert


def test_top_k_schedule_keeps_the_fraction_of_real_tokens_from_its_layer():
    bert = tiny_bert(layers=3)
    batch = random_batch(batch=4, length=20)
    out = PrunableEncoder(bert).eval()(
        batch["input_ids"], batch["attention_mask"], pruner=TopKSchedule({1: 0.5, 2: 0.25}), hard=True
    )
    lengths = batch["attention_mask"].sum(1)
    assert torch.equal(out.kept_counts()[0], lengths)
    assert torch.equal(out.kept_counts()[1], torch.ceil(lengths * 0.5).long())
    assert torch.equal(out.kept_counts()[2], torch.ceil(lengths * 0.25).long())


def test_top_k_schedule_decides_only_at_its_layers_and_exports_with_real_removal(tmp_path):
    pytest.importorskip("onnxruntime")
    from tokprune.serving.export import EncoderGraph, OnnxModel, export_graph

    pruner = TopKSchedule({1: 0.5, 2: 0.25})
    assert [pruner.decides(layer) for layer in range(3)] == [False, True, True]
    encoder = PrunableEncoder(tiny_bert(layers=3)).eval()
    example = random_batch(batch=2, length=9, seed=9)
    graph = OnnxModel(
        export_graph(
            EncoderGraph(encoder, pruner),
            (example["input_ids"], example["attention_mask"], example["token_type_ids"]),
            tmp_path / "s.onnx",
        )
    )
    for seed, (size, length) in enumerate([(1, 7), (1, 20), (4, 16), (3, 30)]):
        batch = random_batch(batch=size, length=length, seed=seed)
        with torch.no_grad():
            out = encoder(batch["input_ids"], batch["attention_mask"], pruner=pruner, hard=True, output="cls")
        cls, kept = graph(batch)
        torch.testing.assert_close(cls, out.hidden[:, 0], atol=1e-5, rtol=0)
        assert torch.equal(kept, out.kept_counts().T)
        assert torch.equal(kept[:, 2], torch.ceil(batch["attention_mask"].sum(1) * 0.25).long())


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and on a loaded machine much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_bench_writes_json_and_plot(glue_dir, tmp_path, one_thread):
    from test_export import pruning_model, write_checkpoint

    cfg = compose(["model=tiny", "budget=smoke", f"data.glue_dir={glue_dir}"])
    # a sweep report of SST-2 for this model whose best Pareto point is a (tiny, pruning) gate checkpoint
    tokenizer = load_tokenizer(cfg.model)
    gate_cfg, gate = pruning_model("gate", "sst2", tokenizer, f"data.glue_dir={glue_dir}")
    checkpoint = write_checkpoint(tmp_path / "gate.ckpt", gate_cfg, gate, tokenizer)
    reports = tmp_path / "reports"
    (reports / "sst2").mkdir(parents=True)
    (reports / "sst2" / "report.json").write_text(
        json.dumps(
            {
                "model": "tiny",
                "methods": [
                    {
                        "method": "gate",
                        "label": "gate",
                        "operating": {"best": 3},
                        "speedup": {"3": {"checkpoint": str(checkpoint)}},
                    },
                    {
                        "method": "top",
                        "label": "top",
                        "operating": {"best": 1},
                        "speedup": {"1": {"skipped": "no MLflow run"}},
                    },
                ],
            }
        )
    )
    out = tmp_path / "bench"
    results = run_bench(cfg, out, schedule={1: 0.5}, examples=16, steps_per_block=2, rounds=1, reports=reports)
    saved = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0 and (out / "engines.png").stat().st_size > 0
    assert saved["speedup"] == results["speedup"]
    steps = {r["method"]: r for r in saved["training_steps"]["rows"]}
    assert set(steps) == {"none", "gate", "transkimmer", "top", "static"} and steps["none"]["ratio_to_baseline"] == 1.0
    assert all(r["median_step_ms"] > 0 for r in steps.values())
    assert {(r["task"], r["batch_size"]) for r in saved["speedup"]} == {
        ("sst2", 1),
        ("sst2", 32),
        ("mrpc", 1),
        ("mrpc", 32),
    }
    for row in saved["speedup"]:
        assert 1.2 < row["flops_reduction"] < 2.0  # half the tokens from layer 1 of 2
        assert row["flops_ratio_real"] == pytest.approx(1 / row["flops_reduction"])
    assert saved["callback_overhead"]["ratio_on_over_off"] > 0
    assert "callback overhead" in summary(saved)

    table = saved["engines"]
    assert [(r["task"], r["config"], r["batch_size"]) for r in table["rows"]] == [
        ("sst2", "keep schedule 0.5 from layer 1", 1),
        ("sst2", "keep schedule 0.5 from layer 1", 32),
        ("sst2", "gate best (trial 3)", 1),
        ("sst2", "gate best (trial 3)", 32),
        ("mrpc", "keep schedule 0.5 from layer 1", 1),
        ("mrpc", "keep schedule 0.5 from layer 1", 32),
        ("rte", "keep schedule 0.5 from layer 1", 1),  # GLUE's longest inputs
        ("rte", "keep schedule 0.5 from layer 1", 32),
    ]
    engines = ("transformers", "onnx_unpruned", "torch_pruned", "onnx_pruned", "onnx_pruned_int8")
    for row in table["rows"]:
        assert row["onnx_kept_equal_torch"] and row["onnx_max_abs_diff"] < 1e-4  # ONNX Runtime removed the same tokens
        assert all(row[f"ms_per_batch_{e}"] > 0 for e in engines)
        assert 0 < row["flops_ratio_real"] < 1 and row["examples"] == 16
        assert row["onnx_share_of_flops_reduction"] == pytest.approx(
            row["onnx_pruned_vs_unpruned"] * row["flops_ratio_real"]
        )
        graphs = row["graphs"]  # operator counts: the unpruned graph fully fused, the pruned one where no one reads
        layers = graphs["onnx_pruned"]["SkipLayerNormalization"] // 2
        assert graphs["onnx_unpruned"]["Attention"] == layers == graphs["onnx_unpruned"]["BiasGelu"]
        assert (
            graphs["onnx_pruned_int8"].get("DynamicQuantizeMatMul", 0)
            + graphs["onnx_pruned_int8"].get("MatMulInteger", 0)
            + graphs["onnx_pruned_int8"].get("QAttention", 0)
            > 0
        )
    schedule_rows = [r for r in table["rows"] if r["config"].startswith("keep schedule")]
    for row in schedule_rows:  # half the tokens from layer 1 of 2 ([CLS] may add one)
        assert 1 / 2.0 < row["flops_ratio_real"] < 1 / 1.2
        ops = row["graphs"]["onnx_pruned"]  # layer 0's probabilities rank the tokens: the others fused
        assert ops["Attention"] == ops["SkipLayerNormalization"] // 2 - 1 and ops["Softmax"] == 1
    assert table["pareto"] == [
        "sst2: top: no best point",
        f"mrpc: no sweep report at {reports / 'mrpc' / 'report.json'}",
        f"rte: no sweep report at {reports / 'rte' / 'report.json'}",
    ]
    printed = summary(saved)
    assert "engines: median ms per batch" in printed and "gate best (trial 3)" in printed
    assert "graphs: nodes and operator counts" in printed

    lengths = saved["lengths"]  # where pruning pays: by input length, batch 1 and 32
    assert [(r["batch_size"], r["length"]) for r in lengths["rows"]] == [
        (size, length) for size in (1, 32) for length in (16, 32, 64, 128, 256)
    ]
    for row in lengths["rows"]:
        assert row["ms_per_batch_onnx_pruned"] > 0 and 1 / 2.0 < row["flops_ratio_real"] < 1 / 1.2
    assert set(lengths["crossover"]) == {"1", "32"} and (out / "lengths.png").stat().st_size > 0
    assert "crossover at batch 1" in printed

    # only=engines: that section again, the others kept from the file
    again = run_bench(cfg, out, schedule={1: 0.5}, examples=4, only=("engines",), reports=tmp_path / "none")
    assert again["speedup"] == saved["speedup"] and again["callback_overhead"] == saved["callback_overhead"]
    assert len(again["engines"]["rows"]) == 6 and again["engines"]["rows"][0]["examples"] == 4
    with pytest.raises(UsageError, match="only= takes speedup, layers, callback, engines, lengths"):
        run_bench(cfg, out, only=("latency",))
