"""Load the backbone: a pretrained BERT-architecture model and its tokenizer."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from omegaconf import DictConfig
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tokprune.errors import UsageError


def model_location(model_cfg: DictConfig) -> str:
    """A local directory for packaged backbones (offline), else the hub name."""
    if model_cfg.get("package"):
        try:
            module = importlib.import_module(model_cfg.package)
        except ImportError:
            raise UsageError(f"model {model_cfg.name}: package '{model_cfg.package}' is not installed") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never ask the hub
        return str(Path(module.get_model_path()))
    return model_cfg.name_or_path


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    # AutoTokenizer, not BertTokenizer(vocab_file=...): in transformers 5 the latter maps
    # every word to [UNK] without complaint.
    return AutoTokenizer.from_pretrained(model_location(model_cfg))


def load_bert(model_cfg: DictConfig) -> BertModel:
    """The pretrained encoder with eager attention, so fvcore sees the attention matmuls.

    ``model.random_init`` (a few BertConfig fields) builds a random-weight model instead,
    with the backbone's vocabulary: the tiny test model.
    """
    hf_logging.disable_progress_bar()
    where = model_location(model_cfg)
    if model_cfg.get("random_init"):
        config = BertConfig.from_pretrained(where, **dict(model_cfg.random_init), attn_implementation="eager")
        return BertModel(config)
    return BertModel.from_pretrained(where, attn_implementation="eager")
