"""Checkpoints that describe themselves, and the one place that reads them.

A tokprune checkpoint is a torch file with Lightning's ``state_dict`` plus a ``tokprune``
entry: the resolved config the run was trained with, the backbone's architecture, the
tokenizer's files, the tokprune version and the training run's id. The model is rebuilt
from the file alone: no MLflow store, no override strings, no hub.

Three ways to use one, each a one-line ``UsageError`` for a missing, unreadable or
mismatched file:

- ``methods.rebuild(path)``: the trained model itself (eval, predict, bench, report): this
  module reads the file (``read_described``) and fills a module (``restore``), the method
  registry next to it builds the module, so the reader never imports the methods;
- ``load_weights(module, path)``: initial weights from a fine-tuned run (the shared protocol's
  start, Transkimmer's ``init_checkpoint``, ToP's student);
- ``methods.base.load_teacher(path, cfg)``: a frozen, eval-mode unpruned reference model
  (``FrozenReference``) that a method distils from without gradients.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from tokprune.errors import UsageError
from tokprune.version import __version__

KEY = "tokprune"
FORMAT = 1


def describe(cfg: DictConfig, backbone: BertConfig, tokenizer: PreTrainedTokenizerBase, run_id: str | None) -> dict:
    """The ``tokprune`` entry of a checkpoint: everything needed to rebuild the model."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    return {
        "format": FORMAT,
        "version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "backbone": backbone.to_dict(),
        "tokenizer_files": files,
        "run_id": run_id,
    }


def read(path: str | Path, what: str = "checkpoint") -> dict:
    """The file's contents (tensors and plain data only); ``what`` names the setting in errors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what}: no such file '{path}'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors and plain data
        detail = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UsageError(
            f"{what} '{path}' is not a tokprune checkpoint: torch.load cannot read it "
            f"({type(exc).__name__}{': ' + detail if detail else ''})"
        ) from None


def state_dict(contents: dict) -> dict:
    return contents.get("state_dict", contents)


@dataclass
class Described:
    """A checkpoint's self-description, parsed."""

    path: Path
    cfg: DictConfig
    backbone: BertConfig
    tokenizer_files: dict[str, bytes]
    run_id: str | None
    version: str
    contents: dict

    def tokenizer(self) -> PreTrainedTokenizerBase:
        with tempfile.TemporaryDirectory() as folder:
            for name, data in self.tokenizer_files.items():
                (Path(folder) / name).write_bytes(data)
            return AutoTokenizer.from_pretrained(folder)

    def bert(self) -> BertModel:
        """The backbone's architecture with untrained weights (the state dict fills them)."""
        config = BertConfig.from_dict({**self.backbone, "attn_implementation": "eager"})
        return BertModel(config)


def read_described(path: str | Path, what: str = "checkpoint") -> Described:
    contents = read(path, what)
    entry = contents.get(KEY) if isinstance(contents, dict) else None
    if not isinstance(entry, dict) or "config" not in entry:
        raise UsageError(
            f"{what} '{path}' holds weights only (no tokprune description): "
            "it was written by another tool or an older tokprune; retrain it"
        )
    if entry.get("format", 0) > FORMAT:
        raise UsageError(f"{what} '{path}' was written by a newer tokprune ({entry.get('version')}); upgrade")
    return Described(
        Path(path),
        OmegaConf.create(entry["config"]),
        entry["backbone"],
        entry.get("tokenizer_files", {}),
        entry.get("run_id"),
        entry.get("version", "?"),
        contents,
    )


def restore(described: Described, module: nn.Module, what: str = "checkpoint") -> nn.Module:
    """``module`` (built from ``described``'s config) with the file's weights, strictly, in eval mode;
    a one-line error when they do not fit. The method registry builds the module (``methods.rebuild``)."""
    try:
        module.load_state_dict(state_dict(described.contents), strict=True)
    except RuntimeError as exc:
        raise UsageError(
            f"{what} '{described.path}' does not fit its own config: "
            f"{str(exc).splitlines()[-1].strip() or str(exc).splitlines()[0]}"
        ) from None
    return module.eval()


def load_weights(module: nn.Module, path: str | Path, what: str, skip: tuple[str, ...] = ("pruner.",)) -> None:
    """Copy a fine-tuned run's weights into ``module``, except entries starting with ``skip``
    (a method's own pruner keeps its init). Every other weight must be present and fit, else
    the file is not a checkpoint of this backbone and task."""
    state = {k: v for k, v in state_dict(read(path, what)).items() if not k.startswith(skip)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another backbone or number of labels
        raise UsageError(f"{what} '{path}' does not fit this model: {str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in result.missing_keys if not k.startswith(skip)]
    if missing:
        raise UsageError(f"{what} '{path}' lacks {len(missing)} weights, e.g. {missing[0]}")


class FrozenReference:
    """A trained model a method calls without gradients, always in eval mode.

    Deliberately not an ``nn.Module`` attribute of the method: its weights stay out of the
    method's state dict, optimiser, checkpoints and ``train()``/``eval()`` switches.
    """

    def __init__(self, module: nn.Module, path: Path):
        self.module, self.path = module.eval().requires_grad_(False), path

    def to(self, device) -> FrozenReference:
        self.module.to(device)
        return self

    def __call__(self, *args, **kwargs):
        self.module.eval()
        with torch.no_grad():
            return self.module(*args, **kwargs)


def check_same_setting(described: Described, cfg: DictConfig, what: str) -> None:
    """A reference model (a teacher) must share the run's task and backbone: a one-line error naming
    what differs."""
    for key in ("task.name", "model.name"):
        theirs, ours = OmegaConf.select(described.cfg, key), OmegaConf.select(cfg, key)
        if theirs != ours:
            raise UsageError(f"{what} '{described.path}' was trained with {key}={theirs}, this run has {key}={ours}")
