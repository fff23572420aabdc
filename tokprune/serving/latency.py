"""Latency of a trained model on a CPU, as a deployer would see it: hard mode (tokens removed)
against the unpruned encoder on the same weights, at batch 1 and 32, timed in turns on real dev
rows; and the same in ONNX Runtime. Used by ``eval``, the report's operating points and the bench.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig

from tokprune.core.data import GlueTask, get_task, load_splits, seeded_subset
from tokprune.core.encoder import KeepAll, PrunableEncoder, Pruner
from tokprune.methods import rebuild
from tokprune.methods.base import PruningModule
from tokprune.methods.checkpoint import Described

#: Batch sizes every trained model's latency is reported at (``eval``, ``report``): one request, and a
#: batch that fills the CPU's vector units.
LATENCY_BATCH_SIZES = (1, 32)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tokenized_batches(rows: dict, tokenizer, size: int, max_length: int) -> list[dict]:
    texts = [rows["text_a"]] + ([rows["text_b"]] if "text_b" in rows.column_names else [])
    out = []
    for i in range(0, len(texts[0]), size):
        chunk = [t[i : i + size] for t in texts]
        enc = tokenizer(*chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


def alternate(encoder: PrunableEncoder, pruner: Pruner, batches: list[dict], other=None):
    """Hard-mode forwards with ``pruner`` and unpruned (and ``other(batch)`` if given), timed
    alternately per batch after two warm-up batches, so load on the machine hits all alike.

    Returns (pruned seconds, unpruned seconds, other seconds, the pruned outputs).
    """
    unpruned = KeepAll()
    t_pruned, t_unpruned, t_other, outputs = [], [], [], []
    with torch.inference_mode():
        for batch in batches[:2]:  # warm-up
            encoder(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), pruner=pruner, output="cls"
            )
        for batch in batches:
            args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            # output="cls": what a classifier needs, so nothing is scattered back to full length
            t_pruned.append(timed(lambda: outputs.append(encoder(*args, pruner=pruner, output="cls"))))
            t_unpruned.append(timed(lambda: encoder(*args, pruner=unpruned, output="cls")))
            if other is not None:
                t_other.append(timed(lambda: other(batch)))
    return t_pruned, t_unpruned, t_other, outputs


def dev_examples(cfg: DictConfig, task: GlueTask, examples: int, glue_dir: str | None = None) -> datasets.Dataset:
    """``examples`` seeded rows of ``task``'s dev split (its train file is not read), from
    ``glue_dir`` when given, else from ``cfg.data``."""
    rows = load_splits(task, cfg.data.glue_dir if glue_dir is None else glue_dir, cfg.data.hub_dataset, ("dev",))
    return seeded_subset(rows["dev"], examples, cfg.seed)


def checkpoint_speedup(
    checkpoint: str, glue_dir: str | None = None, examples: int = 256, batch_sizes=LATENCY_BATCH_SIZES
) -> list[dict]:
    """``trained_speedup`` of the model in a checkpoint file."""
    described, module = rebuild(checkpoint)
    return trained_speedup(described, module, glue_dir, examples, batch_sizes)


def checkpoint_onnx_speedup(
    checkpoint: str, glue_dir: str | None = None, examples: int = 256, batch_sizes=LATENCY_BATCH_SIZES
) -> list[dict]:
    """``onnx_trained_speedup`` of the model in a checkpoint file: its exported graph (reused or
    exported now) against the same weights exported unpruned, in ONNX Runtime."""
    from tokprune.serving.export import session_for

    described, module = rebuild(checkpoint)
    module = module.cpu().eval()
    return onnx_trained_speedup(
        described, session_for(described, module, spinning=False), module, glue_dir, examples, batch_sizes
    )


def trained_speedup(
    described: Described, module: PruningModule, glue_dir: str | None = None, examples: int = 64, batch_sizes=(1,)
) -> list[dict]:
    """Hard-mode latency of a trained model's own pruner vs KeepAll on the same weights, on
    ``examples`` seeded real dev rows of its task, at each batch size: what its savings buy
    on a CPU. The task, max length and (unless ``glue_dir`` is given) data come from the
    checkpoint's description; ``module`` must be on the CPU."""
    cfg = described.cfg
    task = get_task(cfg.task.name)
    dev = dev_examples(cfg, task, examples, glue_dir)
    tokenizer = described.tokenizer()
    return [
        latency(module.encoder, module.pruner, tokenized_batches(dev, tokenizer, size, cfg.task.max_length))
        | {"examples": len(dev), "batch_size": size}
        for size in batch_sizes
    ]


def latency(encoder: PrunableEncoder, pruner: Pruner, batches: list[dict]) -> dict:
    """Median hard-mode time per batch with ``pruner`` and unpruned, timed alternately."""
    t_pruned, t_unpruned, _, outputs = alternate(encoder, pruner, batches)
    kept = [out.kept_fraction().mean() for out in outputs]
    return {
        "ms_per_batch_pruned": 1e3 * statistics.median(t_pruned),
        "ms_per_batch_unpruned": 1e3 * statistics.median(t_unpruned),
        "wall_speedup": sum(t_unpruned) / sum(t_pruned),
        "kept_fraction_mean": float(torch.stack(kept).mean()),
        "threads": torch.get_num_threads(),
    }


def interleaved(engines: dict, batches: list[dict], warmup: int = 2) -> tuple[dict[str, list[float]], dict]:
    """Seconds per batch of each engine (name -> ``fn(batch)``), the engines taking turns on
    every batch after ``warmup`` batches, so load on the machine hits all alike; and each
    engine's outputs. ONNX Runtime sessions must not spin (``OnnxModel(spinning=False)``): a
    session's idle threads otherwise busy-wait through the next engine's turn, which on 2 cores
    made the other engines' batch-1 times several times too slow."""
    times = {name: [] for name in engines}
    outputs = {name: [] for name in engines}
    with torch.inference_mode():
        for batch in batches[:warmup]:
            for fn in engines.values():
                fn(batch)
        for batch in batches:
            for name, fn in engines.items():
                start = time.perf_counter()
                result = fn(batch)
                times[name].append(time.perf_counter() - start)
                outputs[name].append(result)
    return times, outputs


def onnx_trained_speedup(
    described: Described,
    session,
    module: PruningModule,
    glue_dir: str | None = None,
    examples: int = 64,
    batch_sizes=(1,),
) -> list[dict]:
    """``trained_speedup`` in ONNX Runtime: the checkpoint's graph (``session``, an
    ``export.OnnxModel``) against ``module``'s weights with ``KeepAll``, exported now in float32."""
    unpruned = copy.deepcopy(module)
    unpruned.pruner = KeepAll()
    from tokprune.serving.export import OnnxModel, export_module

    cfg = described.cfg
    dev = dev_examples(cfg, get_task(cfg.task.name), examples, glue_dir)
    tokenizer = described.tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        reference = OnnxModel(
            export_module(described, unpruned, Path(folder) / "unpruned.onnx").read_bytes(), spinning=False
        )
    results = []
    for size in batch_sizes:
        batches = tokenized_batches(dev, tokenizer, size, cfg.task.max_length)
        times, outputs = interleaved({"pruned": session, "unpruned": reference}, batches)
        kept = torch.cat([k for _, k in outputs["pruned"]]).double()  # examples x L
        lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).double()
        results.append(
            {
                "ms_per_batch_pruned": 1e3 * statistics.median(times["pruned"]),
                "ms_per_batch_unpruned": 1e3 * statistics.median(times["unpruned"]),
                "wall_speedup": sum(times["unpruned"]) / sum(times["pruned"]),
                "kept_fraction_mean": float((kept / lengths[:, None]).mean()),
                "threads": torch.get_num_threads(),
                "engine": "onnxruntime",
                "examples": len(dev),
                "batch_size": size,
            }
        )
    return results
