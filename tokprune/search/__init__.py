"""Optuna sweeps: the plan (search space), storage and liveness, the trial loop, MLflow records, repeats."""
