"""One training run: the Lightning fit, the token-pruning callback, baseline lookup, MLflow tracking."""
