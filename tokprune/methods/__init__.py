"""One module per method, ``tokprune.methods.<name>``, each exposing a ``Method`` class.

A new method is that file plus ``conf/method/<name>.yaml``; nothing else registers it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig
from transformers import BertModel

from tokprune.core.data import GlueTask, get_task
from tokprune.methods.base import PruningModule
from tokprune.methods.checkpoint import Described, read_described, restore


def build_method(cfg: DictConfig, bert: BertModel, task: GlueTask) -> PruningModule:
    module = importlib.import_module(f"tokprune.methods.{cfg.method.name}")
    return module.Method(cfg, bert, task)


def rebuild(path: str | Path, what: str = "checkpoint") -> tuple[Described, PruningModule]:
    """(description, the trained module in eval mode): the model as it was trained, from the file
    alone (``methods.checkpoint`` reads it; the registry builds its method)."""
    described = read_described(path, what)
    module = build_method(described.cfg, described.bert(), get_task(described.cfg.task.name))
    return described, restore(described, module, what)
