"""Shared fixtures: a tiny random-weight BERT for unit tests, paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
GLUE = SHARED_DATA / "glue"
QQP_SAMPLE = SHARED_DATA / "qqp-sample"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")

requires_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"real GLUE data not found at {GLUE}")
REQUIRE_DATA = "TOKPRUNE_REQUIRE_DATA"  # set (CI's .ci/run does): a missing data folder fails the run


def pytest_sessionstart(session):
    """Without ../shared/data the integration tests skip, with the reason, for a user who has no
    data; CI sets TOKPRUNE_REQUIRE_DATA=1 so that it cannot pass without them."""
    if os.environ.get(REQUIRE_DATA) and not (GLUE.is_dir() and QQP_SAMPLE.is_dir()):
        pytest.exit(
            f"{REQUIRE_DATA} is set but the real data is not at {SHARED_DATA} (glue/ and qqp-sample/): "
            "the integration tests would skip",
            returncode=1,
        )


def tiny_bert(seed: int = 0, layers: int = 3) -> BertModel:
    """A random-weight BERT small enough for millisecond tests."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertModel(config).eval()


def random_batch(batch: int = 4, length: int = 12, vocab: int = 120, seed: int = 0) -> dict:
    """Token ids with varied real lengths, padding at the end, [CLS]=101-like id 1 first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def quiet_trainer(**settings):
    """A Lightning Trainer for unit tests: CPU, no logger, checkpoints, progress bar or validation."""
    import lightning as L

    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        **settings,
    )


def kept_after_steps(module, batch: dict, steps: int, lr: float, seed: int) -> float:
    """Eval-mode kept fraction after ``steps`` AdamW steps of a method's own losses on one batch
    (its parameter groups and post-step projection included; same data, init and noise per seed)."""
    train_steps(module, batch, steps, lr, seed)
    module.eval()
    with torch.no_grad():
        return float(module(batch)[1].kept_fraction().mean())


def train_steps(module, batch: dict, steps: int, lr: float, seed: int, after_step=None) -> None:
    """``steps`` AdamW steps of a method's own losses on one batch (its parameter groups and
    post-step projection included); ``after_step(out)`` sees each training forward's output."""
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=lr)
    torch.manual_seed(seed)
    module.train()
    for _ in range(steps):
        logits, out = module(batch)
        loss = sum(module.losses(logits, out, batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.after_optimizer_step()
        if after_step is not None:
            after_step(out)


@pytest.fixture
def glue_dir() -> str:
    if not GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE}")
    return f"{GLUE}:{QQP_SAMPLE}"


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny-model tests run faster on one thread (no thread start-up per op); the slow
    integration tests on the real backbone keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
