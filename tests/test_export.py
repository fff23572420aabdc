"""ONNX export with real token removal: on real SST-2 and MRPC dev rows the exported graph's
predictions equal tokprune's hard mode (logits within 1e-4, kept counts per layer identical) for
every method, at batch 1 and in padded batches; `export`, `eval engine=onnx` and
`tokprune.load(engine="onnx")` on checkpoints built directly (tiny random-weight models whose
pruners are set to prune, the MiniLM tokenizer); beside them, `eval`'s torch computations."""

import collections
import os
import sys

import pytest
import torch
from transformers import BertConfig, BertModel

import tokprune
from tokprune.cli import main
from tokprune.config import compose
from tokprune.core.backbone import load_tokenizer
from tokprune.core.data import get_task, read_glue_tsv
from tokprune.errors import UsageError
from tokprune.methods import build_method
from tokprune.methods.checkpoint import describe
from tokprune.serving.export import (
    BertGraph,
    ClassifierGraph,
    OnnxModel,
    default_output,
    example_inputs,
    export_graph,
)

from conftest import GLUE, requires_glue

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

METHODS = ("none", "transkimmer", "gate", "top", "static")
TASKS = ("sst2", "mrpc")
LAYERS = 4
ROWS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(compose(["model=tiny"]).model)


def tiny_real_vocab(tokenizer, seed: int = 0) -> BertModel:
    """A random 4-layer BERT with the MiniLM tokenizer's vocabulary, so real text runs through it."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    return BertModel(config).eval()


def pruning_model(method: str, task: str, tokenizer, *overrides: str):
    """The method on the tiny model with its pruner set to prune something (eval mode)."""
    cfg = compose([f"method={method}", "model=tiny", f"task={task}", *overrides])
    module = build_method(cfg, tiny_real_vocab(tokenizer), get_task(task)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if method == "transkimmer":  # decisions that depend on the token: about half skimmed per layer
            for predictor in module.pruner.predictors:
                predictor.net[4].weight.normal_(0.0, 1.0, generator=g)
                predictor.net[4].bias.zero_()
        elif method == "gate":  # random gates: ranks above or below the threshold
            module.pruner.weights.copy_(torch.rand(module.pruner.weights.shape, generator=g))
        elif method == "top":  # every layer gate on, some rank bins off
            module.pruner.token_log_alpha.copy_(torch.randn(module.pruner.token_log_alpha.shape, generator=g) * 3)
            module.pruner.layer_log_alpha.fill_(4.0)
    return cfg, module


def write_checkpoint(path, cfg, module, tokenizer):
    """A tokprune checkpoint as train() writes one (state dict + self-description)."""
    selected = {"rule": module.selection_rule, "epoch": 0, "step": 0, "metrics": {}}
    torch.save(
        {
            "state_dict": module.state_dict(),
            "tokprune": {**describe(cfg, module.encoder.config, tokenizer, None), "selected": selected},
        },
        path,
    )
    return path


def dev_texts(task: str, rows: int = ROWS) -> list[list[str]]:
    spec = get_task(task)
    data = read_glue_tsv(GLUE / spec.folder / spec.dev_file, spec)
    return [data["text_a"][:rows]] + ([data["text_b"][:rows]] if "text_b" in data else [])


def batches(tokenizer, texts, size: int, max_length: int):
    for start in range(0, len(texts[0]), size):
        chunk = [column[start : start + size] for column in texts]
        yield dict(tokenizer(*chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@requires_glue
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_exported_graph_equals_hard_mode_on_real_dev_rows(method, task, tokenizer, tmp_path):
    cfg, module = pruning_model(method, task, tokenizer)
    path = export_graph(ClassifierGraph(module), example_inputs(tokenizer, task == "mrpc"), tmp_path / "m.onnx")
    graph = OnnxModel(path, threads=1)
    texts = dev_texts(task)
    kept_rows = []
    for size in (1, 8):  # batch 1, and padded batches
        for batch in batches(tokenizer, texts, size, cfg.task.max_length):
            with torch.no_grad():
                logits, out = module(batch, hard=True)
            onnx_logits, onnx_kept = graph(batch)
            torch.testing.assert_close(onnx_logits, logits, atol=1e-4, rtol=0)
            assert torch.equal(onnx_logits.argmax(-1), logits.argmax(-1))
            assert torch.equal(onnx_kept, out.kept_counts().T)
            kept_rows += onnx_kept.tolist()
    lengths = [len(ids) for ids in tokenizer(*texts, truncation=True, max_length=cfg.task.max_length)["input_ids"]]
    assert len({tuple(k) for k in kept_rows}) > 5  # every input keeps its own number of tokens
    if method == "none":
        assert [k[0] for k in kept_rows[:ROWS]] == lengths
    else:  # the pruner removed tokens in the graph, in some rows more than in others
        removed = [length - k[-1] for k, length in zip(kept_rows[:ROWS], lengths)]
        assert min(removed) >= 0 and sum(r > 0 for r in removed) >= ROWS // 2 and len(set(removed)) > 1
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    if method == "none":  # nothing decides: no packing step at all, the padding stays as invalid keys
        assert "TopK" not in ops and "GatherElements" not in ops
    else:
        assert {"TopK", "Gather", "GatherElements", "Range"} <= ops  # packing: sort on unique keys, gather kept


def op_counts(path) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node))


@pytest.mark.parametrize("method", METHODS)
def test_every_layer_of_a_pruned_graph_gets_the_unpruned_graphs_fusions(method, tokenizer, tmp_path):
    """Fused attention in each layer whose probabilities no pruner reads, skip-layer-norm twice
    and bias-GELU once in every layer: as in the unpruned graph (ours and transformers')."""
    _, module = pruning_model(method, "mrpc", tokenizer)
    example = example_inputs(tokenizer, True)
    pruned = op_counts(export_graph(ClassifierGraph(module), example, tmp_path / "pruned.onnx"))
    unpruned = op_counts(
        export_graph(ClassifierGraph(pruning_model("none", "mrpc", tokenizer)[1]), example, tmp_path / "u.onnx")
    )
    reference = op_counts(export_graph(BertGraph(tiny_real_vocab(tokenizer)), example, tmp_path / "t.onnx"))
    read = sum(module.pruner.wants_attention(layer + 1) for layer in range(LAYERS - 1))
    for graph in (unpruned, reference):
        assert graph.get("Attention") == LAYERS and "Softmax" not in graph
    assert pruned.get("Attention", 0) == LAYERS - read and pruned.get("Softmax", 0) == read
    assert pruned["SkipLayerNormalization"] == unpruned["SkipLayerNormalization"] == 2 * LAYERS
    assert pruned["BiasGelu"] == unpruned["BiasGelu"] == reference["BiasGelu"] == LAYERS
    if method == "transkimmer":  # decisions from hidden states: every layer fused
        assert read == 0
    elif method != "none":  # importance from received attention: the layers before a decision are not
        assert read > 0


@requires_glue
def test_standard_operator_graph_equals_the_fused_one(tokenizer, tmp_path):
    """``fused=False``: no ONNX Runtime contrib operator, the same outputs (for other runtimes)."""
    cfg, module = pruning_model("static", "mrpc", tokenizer)
    example = example_inputs(tokenizer, True)
    standard = export_graph(ClassifierGraph(module), example, tmp_path / "s.onnx", fused=False)
    assert {node.domain for node in onnx.load(str(standard)).graph.node} <= {"", "ai.onnx"}
    fused = OnnxModel(export_graph(ClassifierGraph(module), example, tmp_path / "f.onnx"), threads=1)
    plain = OnnxModel(standard, threads=1)
    assert plain.metadata["graph"] == "standard" and fused.metadata["graph"] == "fused"
    for batch in batches(tokenizer, dev_texts("mrpc"), 8, cfg.task.max_length):
        (a, kept_a), (b, kept_b) = fused(batch), plain(batch)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert torch.equal(kept_a, kept_b)


@requires_glue
def test_int8_export_keeps_token_removal_and_close_logits(tokenizer, tmp_path, capsys):
    cfg, module = pruning_model("gate", "mrpc", tokenizer, f"data.glue_dir={GLUE}")
    checkpoint = write_checkpoint(tmp_path / "gate.ckpt", cfg, module, tokenizer)
    assert main(["export", f"checkpoint={checkpoint}", "quantize=int8"]) == 0
    path = default_output(checkpoint, "int8")
    assert path.name == "gate.ckpt.int8.onnx" and "int8 (dynamic quantisation)" in capsys.readouterr().out
    ops = op_counts(path)
    assert ops.get("QAttention", 0) + ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulInteger", 0) > 0
    assert {"TopK", "GatherElements"} <= set(ops)  # the token removal is still in the graph
    graph = OnnxModel(path, threads=1)
    assert graph.metadata["quantize"] == "int8" and graph.metadata["method"] == "gate"
    removed = 0
    for batch in batches(tokenizer, dev_texts("mrpc"), 8, cfg.task.max_length):
        with torch.no_grad():
            logits, out = module(batch, hard=True)
        q_logits, q_kept = graph(batch)
        assert (q_logits - logits).abs().max() < 0.1  # int8 rounding, not a different model
        removed += int((batch["attention_mask"].sum(1) - q_kept[:, -1]).sum())
    assert removed > 0
    reused = tokprune.load(checkpoint, engine="onnx", quantize="int8")  # predict runs the int8 file
    assert reused.onnx.source == f"reused {path}" and len(reused.predict([("fine", "ok"), ("dull", "bad")])) == 2
    with pytest.raises(UsageError, match="quantize=int8 is an ONNX Runtime graph: use engine=onnx"):
        tokprune.load(checkpoint, quantize="int8")
    assert main(["export", f"checkpoint={checkpoint}", "quantize=int4"]) == 2
    assert "quantize must be int8 (or left out for float32), not 'int4'" in capsys.readouterr().err
    assert main(["eval", f"checkpoint={checkpoint}", "quantize=int8"]) == 2
    assert "quantize=int8 is an ONNX Runtime graph: use engine=onnx" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gate_checkpoint(tokenizer, tmp_path_factory):
    cfg, module = pruning_model("gate", "sst2", tokenizer, f"data.glue_dir={GLUE}")
    return write_checkpoint(tmp_path_factory.mktemp("gate") / "best.ckpt", cfg, module, tokenizer)


@pytest.mark.slow
@requires_glue
def test_export_command_load_and_reuse(gate_checkpoint, tmp_path, capsys):
    texts = dev_texts("sst2", 12)[0]
    torch_model = tokprune.load(gate_checkpoint, batch_size=4)
    expected = torch_model.predict(texts)
    on_the_fly = tokprune.load(gate_checkpoint, engine="onnx", batch_size=4)
    assert on_the_fly.onnx.source == "exported on the fly"
    assert on_the_fly.predict(texts) == expected  # same labels, same kept counts per layer
    assert any(p.kept_per_layer[-1] < p.kept_per_layer[0] for p in expected)

    out = tmp_path / "gate.onnx"
    assert main(["export", f"checkpoint={gate_checkpoint}", f"output={out}"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["tokprune.method"] == "gate" and meta["tokprune.task"] == "sst2" and meta["tokprune.layers"] == "4"
    assert OnnxModel(out).metadata["checkpoint"] == str(gate_checkpoint.resolve())

    default = default_output(gate_checkpoint)
    assert main(["export", f"checkpoint={gate_checkpoint}"]) == 0 and default.is_file()
    reused = tokprune.load(gate_checkpoint, engine="onnx", batch_size=3)
    assert reused.onnx.source == f"reused {default}"
    assert reused.predict(texts) == expected
    stale = gate_checkpoint.stat().st_mtime - 60
    os.utime(default, (stale, stale))  # older than the checkpoint: exported again, not reused
    assert tokprune.load(gate_checkpoint, engine="onnx").onnx.source == "exported on the fly"
    default.unlink()

    source, target = tmp_path / "in.txt", tmp_path / "out.tsv"
    source.write_text("\n".join(texts) + "\n")
    assert main(["predict", f"checkpoint={gate_checkpoint}", f"input={source}", f"output={target}", "engine=onnx"]) == 0
    assert "hard mode, ONNX Runtime: exported on the fly" in capsys.readouterr().out
    lines = target.read_text().splitlines()[1:]
    assert [line.split("\t")[2] for line in lines] == [",".join(map(str, p.kept_per_layer)) for p in expected]


@pytest.mark.slow
@requires_glue
def test_eval_engine_onnx_gives_the_torch_metrics_flops_and_kept_fractions(
    gate_checkpoint, tmp_path, capsys, monkeypatch
):
    from tokprune.serving.evaluate import evaluate, summary

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # not there: not logged
    words = [f"data.glue_dir={GLUE}", "data.eval_subset=24", "train.eval_batch_size=8"]
    on_torch = evaluate(gate_checkpoint, [*words, "eval.latency_examples=0"])
    on_onnx = evaluate(gate_checkpoint, [*words, "eval.latency_examples=4"], engine="onnx")
    assert on_onnx.engine == "onnx" and on_onnx.rows == on_torch.rows == 24
    for name, value in on_torch.metrics.items():
        assert on_onnx.metrics[name] == pytest.approx(value, abs=1e-6), name
    assert on_torch.metrics["eval/flops_ratio_real"] < 0.95  # the gates pruned
    assert [row["batch_size"] for row in on_onnx.latency] == [1, 32]
    assert all(row["engine"] == "onnxruntime" and row["ms_per_batch_pruned"] > 0 for row in on_onnx.latency)
    text = summary(on_onnx)
    assert "hard mode, ONNX Runtime: exported on the fly" in text
    assert "CPU latency, ONNX Runtime, pruned vs unpruned float32 graph, same weights (4 dev rows" in text

    assert main(["eval", f"checkpoint={gate_checkpoint}", "engine=tensorrt"]) == 2
    assert "engine must be one of torch, onnx, not 'tensorrt'" in capsys.readouterr().err


@pytest.mark.slow
@requires_glue
def test_eval_computations_measure_the_train_eval_gap_on_a_checkpoint(tokenizer, tmp_path, monkeypatch):
    from tokprune.serving.evaluate import evaluate, summary

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    words = [f"data.glue_dir={GLUE}", "data.eval_subset=32", "train.eval_batch_size=8", "eval.latency_examples=0"]
    renormalised = write_checkpoint(tmp_path / "r.ckpt", *pruning_model("transkimmer", "sst2", tokenizer), tokenizer)
    hard = evaluate(renormalised, words)
    soft = evaluate(renormalised, [*words, "eval.computation=soft"])
    assert soft.computation == "soft" and "soft computation with the evaluation's decisions" in summary(soft)
    for name, value in hard.metrics.items():  # the default rule is hard-equivalent: the same numbers
        assert soft.metrics[name] == pytest.approx(value, abs=1e-6), name
    assert hard.metrics["eval/flops_ratio_real"] < 0.95
    training = evaluate(renormalised, [*words, "eval.computation=training"])  # Gumbel samples, not argmax
    assert training.kept_fractions != pytest.approx(hard.kept_fractions, abs=1e-3)

    cfg, module = pruning_model("transkimmer", "sst2", tokenizer, "method.train_attention=reference")
    reference = write_checkpoint(tmp_path / "p.ckpt", cfg, module, tokenizer)
    hard, soft = evaluate(reference, words), evaluate(reference, [*words, "eval.computation=soft"])
    assert hard.kept_fractions[0] == pytest.approx(soft.kept_fractions[0])  # the same first decisions ...
    assert abs(hard.metrics["eval/loss"] - soft.metrics["eval/loss"]) > 1e-5  # ... a different computation
    with pytest.raises(UsageError, match="eval.computation=soft runs in torch"):
        evaluate(reference, [*words, "eval.computation=soft"], engine="onnx")


def test_missing_onnxruntime_is_one_line(gate_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(
        UsageError,
        match=r"ONNX needs the 'onnxruntime' package, which is not installed: "
        r"pip install 'tokprune\[onnx\]'",
    ):
        tokprune.load(gate_checkpoint, engine="onnx")
    source = tmp_path / "in.txt"
    source.write_text("fine\n")
    assert (
        main(
            [
                "predict",
                f"checkpoint={gate_checkpoint}",
                f"input={source}",
                f"output={tmp_path / 'o.tsv'}",
                "engine=onnx",
            ]
        )
        == 2
    )
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tokprune: error: ONNX needs the 'onnxruntime' package")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", f"checkpoint={gate_checkpoint}"]) == 2
    assert "ONNX needs the 'onnx' package" in capsys.readouterr().err
    assert main(["export"]) == 2 and "export needs checkpoint=PATH" in capsys.readouterr().err


def test_sessions_timed_in_turns_do_not_spin(tokenizer, tmp_path):
    path = export_graph(
        ClassifierGraph(pruning_model("none", "sst2", tokenizer)[1]),
        example_inputs(tokenizer, False),
        tmp_path / "m.onnx",
    )
    entry = "session.intra_op.allow_spinning"
    assert OnnxModel(path, spinning=False).session.get_session_options().get_session_config_entry(entry) == "0"
    with pytest.raises(Exception):  # noqa: B017 (ONNX Runtime raises a bare RuntimeError subclass) ONNX Runtime's default (spinning allowed) is left alone: no entry
        OnnxModel(path).session.get_session_options().get_session_config_entry(entry)
