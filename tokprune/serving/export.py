"""ONNX export with real token removal: ``python -m tokprune export checkpoint=PATH [output=FILE]``.

The exported graph is the trained model in hard mode, traced through the same code that
``PrunableEncoder`` runs in torch: every pruning decision is made inside the graph (importance
ranks from the previous layer's attention, predictor or gate decisions) and the dropped tokens
are removed for real, with data-dependent shapes (a TopK sort on unique keys and a Gather to the
batch's largest kept count). Every method exports (``none``, ``transkimmer``, ``gate``, ``top``,
``static``). Nothing of a method is forked for export: the encoder's hard path
and every pruner's eval-mode ``forward`` are traceable (no Python number is read from a
data-dependent tensor; values that depend on weights only, such as ToP's deterministic masks,
are computed outside the trace (``encoder.untraced``) and folded into constants, which is what
they are after training). Sorts are exported as ONNX TopK, which the standard defines as stable,
so the importance ranks (``argsort(stable=True)``) tie-break exactly as in torch.

- inputs: ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, B x N; both axes dynamic);
- outputs: ``logits`` (B x labels) and ``kept`` (B x L int64: the tokens each layer computed,
  [CLS] and [SEP] included: ``EncoderOutput.kept_counts()`` transposed).

Batches: every method exports for batch 1 and for padded batches (examples of a batch are packed
to the largest kept count, as in torch hard mode; padding is never kept). With padding, an
example's logits may differ from its batch-1 logits by float rounding only.

The file carries its origin in ONNX metadata (``tokprune.*``: version, method, task, model,
layers, the checkpoint it came from). ``PrunedModel.load(path, engine="onnx")`` and
``tokprune eval engine=onnx`` reuse ``<checkpoint>.onnx`` when it exists and is newer than the
checkpoint (what this command writes by default); otherwise they export to a temporary file.

Exporting needs the optional ``onnx`` extra (``pip install 'tokprune[onnx]'``; ``make install``
installs it): ``onnx`` to write the metadata, ``onnxruntime`` to run the graph.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tokprune.core.encoder import PrunableEncoder, Pruner
from tokprune.core.fused_attention import DOMAIN, standard_operators
from tokprune.errors import UsageError
from tokprune.version import __version__

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("logits", "kept")
#: The example a graph is traced on: its values do not matter (the trace keeps no data-dependent
#: number), but a padded batch of two exercises every op the packing uses.
EXAMPLE = ("a gripping , funny and moving film that never drags for a moment", "dull")
EXAMPLE_PAIR = ("the company said profits rose sharply in the third quarter", "it fell")
#: Files whose tracer warnings fail an export: no value may be frozen there.
SHARED = ("encoder.py", "export.py", "bench.py")


def require(module: str):
    """Import ``onnx`` or ``onnxruntime``, or fail with one line saying how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(
            f"ONNX needs the '{module}' package, which is not installed: "
            "pip install 'tokprune[onnx]' (make install does it)"
        ) from None


class ClassifierGraph(nn.Module):
    """A trained ``PruningModule`` as exported: its own hard-mode forward, keyword inputs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        logits, out = self.module(batch, hard=True)
        return logits, out.kept_counts().T


class EncoderGraph(nn.Module):
    """A bare encoder with any pruner (the benchmark's keep schedule): outputs [CLS]'s final
    state (in the ``logits`` slot, B x d) and the kept counts."""

    def __init__(self, encoder: PrunableEncoder, pruner: Pruner | None = None):
        super().__init__()
        self.encoder, self.pruner = encoder, pruner

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor):
        out = self.encoder(input_ids, attention_mask, token_type_ids, pruner=self.pruner, hard=True, output="cls")
        return out.hidden[:, 0], out.kept_counts().T


class BertGraph(nn.Module):
    """transformers' own ``BertModel`` forward (the unpruned reference), called by keyword:
    positional arguments clash with ``use_cache`` in transformers 5. Outputs [CLS]'s final state
    and, for the same interface, every real token as kept by every layer."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        layers = self.bert.config.num_hidden_layers
        return hidden[:, 0], attention_mask.sum(1, keepdim=True).expand(-1, layers)


def example_inputs(tokenizer, pairs: bool) -> tuple[Tensor, Tensor, Tensor]:
    texts = [list(EXAMPLE_PAIR), ["and", "so"]] if pairs else [list(EXAMPLE)]
    encoded = tokenizer(*texts, padding=True, return_tensors="pt")
    ids = encoded["input_ids"]
    return ids, encoded["attention_mask"], encoded.get("token_type_ids", torch.zeros_like(ids))


def _stable_sort(g, self, *args):
    """ONNX for ``argsort``/``sort`` with ``stable=True`` (torch's exporter has none): TopK over
    the whole axis, which the ONNX standard defines as stable (equal values keep index order),
    so ties rank in the graph exactly as in torch. Returns (values, indices)."""
    from torch.onnx import symbolic_helper

    dim, descending = args[-2:] if len(args) == 3 else args[:2]  # (stable, dim, descending) or (dim, descending)
    dim = symbolic_helper._get_const(dim, "i", "dim")
    descending = symbolic_helper._get_const(descending, "b", "descending")
    size = g.op("Gather", g.op("Shape", self), g.op("Constant", value_t=torch.tensor([dim], dtype=torch.int64)))
    return g.op("TopK", self, size, axis_i=dim, largest_i=int(bool(descending)), sorted_i=1, outputs=2)


def _argsort(g, self, *args):
    return _stable_sort(g, self, *args)[1]


SYMBOLICS = {"aten::argsort": _argsort, "aten::sort": _stable_sort}


def export_graph(
    graph: nn.Module,
    inputs: tuple[Tensor, Tensor, Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    fused: bool = True,
) -> Path:
    """Trace ``graph`` (eval mode, no grad) into an ONNX file at ``path``.

    ``fused`` (default): the graph ONNX Runtime runs fastest. Attention of every layer whose
    probabilities nobody reads is the fused ``com.microsoft.Attention`` operator
    (``core.fused_attention``; transformers' own graph gets it from the optimizer, which finds its
    mask), then ``onnxruntime.transformers.optimizer`` fuses skip-layer-norm and bias-GELU in
    every layer (the same fusions in a pruned and an unpruned graph). ``fused=False``: standard
    ONNX operators only, for other runtimes.

    A trace that freezes a tensor into a Python number in the shared machinery (``SHARED``)
    would make the graph keep the example's token counts for every input, so it is an error
    here. A method's own eval path may fold values that depend on its weights only (ToP's
    deterministic masks); that a method froze nothing data-dependent is what the equality tests
    on real rows (tests/test_export.py) check.
    """
    require("onnx")  # before tracing: the metadata is written with it
    path = Path(path)
    graph = graph.eval()
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {name: {0: "batch"} for name in OUTPUTS}
    for name, symbolic in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, OPSET)
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(record=True) as caught,
            nullcontext() if fused else standard_operators(),
        ):
            warnings.simplefilter("always")
            torch.onnx.export(
                graph,
                tuple(inputs),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_axes=axes,
                custom_opsets={DOMAIN: 1},
            )
    finally:
        for name in SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)
    package = Path(__file__).resolve().parent.parent
    frozen = [
        w
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning)
        and Path(w.filename).name in SHARED
        and package in Path(w.filename).resolve().parents
    ]
    if frozen:
        path.unlink(missing_ok=True)
        w = frozen[0]
        raise RuntimeError(
            f"export would freeze a data-dependent value ({Path(w.filename).name}:{w.lineno}: "
            f"{str(w.message).splitlines()[0]})"
        )
    if fused:
        optimize_graph(path, _bert_config(graph))
    add_metadata(path, {**(metadata or {}), "graph": "fused" if fused else "standard"})
    return path


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Write ``metadata`` into the ONNX file at ``path`` as ``tokprune.<key>`` properties."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"tokprune.{key}", str(value)
    onnx.save(model, str(path))


def _bert_config(graph: nn.Module):
    """The BERT config of the encoder inside ``graph`` (heads and width for the optimizer)."""
    return next(m.config for m in graph.modules() if hasattr(getattr(m, "config", None), "num_attention_heads"))


def optimize_graph(path: Path, config) -> None:
    """ONNX Runtime's transformer optimizer on the file at ``path``, in place: skip-layer-norm,
    bias-GELU and (where it finds the mask: transformers' graph) attention fusions."""
    from onnxruntime.transformers import optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(
            str(path),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
            opt_level=0,  # the session applies ONNX Runtime's own graph optimisations when it loads
        )
    model.save_model_to_file(str(path))


def quantize_graph(source: Path, target: Path) -> Path:
    """ONNX Runtime dynamic int8 quantisation of an exported graph (weights int8 ahead of time,
    activations per batch): the fused attention and the projections become integer kernels;
    the pruning operators stay as they are. The quantiser keeps the metadata; ``quantize=int8`` is added."""
    onnx = require("onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # shape inference cannot type the outputs of contrib operators (the fused graph's): float32;
    # the quantiser logs a warning for every integer tensor of the pruning step it leaves alone
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    add_metadata(target, {"quantize": "int8"})
    return target


def checkpoint_metadata(described, num_layers: int) -> dict[str, str]:
    cfg = described.cfg
    return {
        "version": __version__,
        "method": cfg.method.name,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "layers": str(num_layers),
        "checkpoint": str(Path(described.path).resolve()),
        "run_id": described.run_id or "",
        "outputs": "logits: B x labels; kept: B x layers",
    }


QUANTIZE = ("int8",)  # export quantize=...: ONNX Runtime dynamic quantisation


def check_quantize(quantize: str | None) -> None:
    if quantize not in (None, *QUANTIZE):
        raise UsageError(f"quantize must be {' or '.join(QUANTIZE)} (or left out for float32), not '{quantize}'")


def export_module(described, module, path: str | Path, quantize: str | None = None, fused: bool = True) -> Path:
    """Export a rebuilt checkpoint (``checkpoint.rebuild``) to ``path``; ``quantize="int8"``:
    the fused float graph, then dynamically quantised."""
    from tokprune.core.data import get_task

    check_quantize(quantize)
    module = module.cpu().eval()
    pairs = len(get_task(described.cfg.task.name).tsv_text) == 2
    inputs = example_inputs(described.tokenizer(), pairs)
    metadata = checkpoint_metadata(described, module.encoder.num_layers)
    if quantize is None:
        return export_graph(ClassifierGraph(module), inputs, path, metadata, fused=fused)
    with tempfile.TemporaryDirectory() as folder:
        float_graph = export_graph(ClassifierGraph(module), inputs, Path(folder) / "float.onnx", metadata, fused=fused)
        return quantize_graph(float_graph, Path(path))


def default_output(checkpoint: str | Path, quantize: str | None = None) -> Path:
    """``<checkpoint>.onnx`` (``<checkpoint>.int8.onnx`` quantised): where ``export`` writes and
    ``engine=onnx`` looks first."""
    return Path(f"{checkpoint}.{quantize}.onnx" if quantize else f"{checkpoint}.onnx")


def run_export(checkpoint: str, output: str | None = None, quantize: str | None = None, fused: bool = True) -> str:
    """The ``export`` command: returns the line to print."""
    from tokprune.methods import rebuild

    require("onnx")
    check_quantize(quantize)
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint: no such file '{checkpoint}'")
    if quantize and not fused:
        raise UsageError("quantize=int8 quantises the fused graph: drop fused=false")
    target = Path(output) if output else default_output(checkpoint, quantize)
    if not target.parent.is_dir():
        raise UsageError(f"output: no such folder '{target.parent}'")
    described, module = rebuild(checkpoint)
    export_module(described, module, target, quantize=quantize, fused=fused)
    size = target.stat().st_size / 2**20
    graph = "int8 (dynamic quantisation), " if quantize else ("" if fused else "standard ONNX operators, ")
    runtime = "ONNX Runtime" if fused else "any ONNX runtime"
    return (
        f"wrote {target} ({size:.1f} MiB, ONNX opset {OPSET}, {graph}for {runtime}): {described.cfg.method.name} "
        f"{described.cfg.task.name}, hard mode with real token removal; inputs {', '.join(INPUTS)}; "
        f"outputs logits, kept (tokens per layer)"
    )


# -- running a graph ---------------------------------------------------------------------------


class OnnxModel:
    """An exported graph in an ONNX Runtime session: ``(logits, kept)`` for a tokenised batch."""

    def __init__(
        self, path_or_bytes: str | Path | bytes, threads: int | None = None, source: str = "", spinning: bool = True
    ):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        if not spinning:  # idle worker threads sleep instead of spinning: for timings that take turns
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        model = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.metadata = {
            k.removeprefix("tokprune."): v
            for k, v in self.session.get_modelmeta().custom_metadata_map.items()
            if k.startswith("tokprune.")
        }
        self.source = source  # how it was obtained: "reused <file>" or "exported on the fly"

    def run(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        ids = batch["input_ids"]
        types = batch.get("token_type_ids")
        feeds = {
            "input_ids": ids,
            "attention_mask": batch["attention_mask"],
            "token_type_ids": types if types is not None else torch.zeros_like(ids),
        }
        feeds = {
            name: np.ascontiguousarray(value.detach().cpu().numpy(), dtype=np.int64) for name, value in feeds.items()
        }
        logits, kept = self.session.run(list(OUTPUTS), feeds)
        return logits, kept

    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(logits B x labels, kept B x L) as tensors."""
        logits, kept = self.run(batch)
        return torch.from_numpy(logits), torch.from_numpy(kept)


def session_for(
    described, module, threads: int | None = None, spinning: bool = True, quantize: str | None = None
) -> OnnxModel:
    """The checkpoint's graph in a session: ``<checkpoint>.onnx`` (``.int8.onnx`` with
    ``quantize``) if it exists, is newer than the checkpoint and is a tokprune export of the same
    method, task and quantisation; else exported now to a temporary file (removed once loaded)."""
    require("onnxruntime")
    check_quantize(quantize)
    checkpoint = Path(described.path)
    cached = default_output(checkpoint, quantize)
    if cached.is_file() and cached.stat().st_mtime >= checkpoint.stat().st_mtime:
        model = OnnxModel(cached, threads, source=f"reused {cached}", spinning=spinning)
        expected = checkpoint_metadata(described, module.encoder.num_layers)
        same = all(model.metadata.get(key) == expected[key] for key in ("method", "task", "model", "layers"))
        if same and model.metadata.get("quantize") == quantize:
            return model
    with tempfile.TemporaryDirectory() as folder:
        path = export_module(described, module, Path(folder) / "model.onnx", quantize=quantize)
        return OnnxModel(path.read_bytes(), threads, source="exported on the fly", spinning=spinning)
