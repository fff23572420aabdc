"""tokprune: token pruning for BERT-style encoders, compared fairly on accuracy vs FLOPs."""

from tokprune.version import __version__  # noqa: F401 (the package's version)


def load(path, engine: str = "torch", batch_size: int = 32, quantize: str | None = None):
    """A trained checkpoint ready to label text, in hard mode::

        model = tokprune.load("checkpoints/<run id>/best.ckpt")
        model.predict(["a gripping film", "dull"])  # -> [Prediction(label="1", kept_per_layer=(6, 6, ...)), ...]

    ``engine="onnx"`` runs the model exported to ONNX (pruning decisions and token removal
    inside the graph) in ONNX Runtime: ``<path>.onnx`` when it is newer than the checkpoint
    (``python -m tokprune export``), else exported on the fly; it needs ``tokprune[onnx]``.
    ``quantize="int8"`` (with ``engine="onnx"``) runs the int8 graph (``<path>.int8.onnx``).

    Returns a ``tokprune.serving.predict.PrunedModel``. torch and transformers load on the first
    call, not on ``import tokprune``.
    """
    from tokprune.serving.predict import PrunedModel

    return PrunedModel.load(path, engine=engine, batch_size=batch_size, quantize=quantize)
