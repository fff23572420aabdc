"""One module per method, ``tokprune.methods.<name>``, each exposing a ``Method`` class.

A new method is that file plus ``conf/method/<name>.yaml``; nothing else registers it.
"""

from __future__ import annotations

import importlib

from omegaconf import DictConfig
from transformers import BertModel

from tokprune.core.data import GlueTask
from tokprune.methods.base import PruningModule


def build_method(cfg: DictConfig, bert: BertModel, task: GlueTask) -> PruningModule:
    module = importlib.import_module(f"tokprune.methods.{cfg.method.name}")
    return module.Method(cfg, bert, task)
