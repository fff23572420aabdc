"""tokprune: token pruning for BERT-style encoders, compared fairly on accuracy vs FLOPs."""

__version__ = "0.1.0"
