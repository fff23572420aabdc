"""``python -m tokprune <command> key=value ...``

Commands: ``train`` (one run). Every bad input ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from tokprune.errors import UsageError

COMMANDS = {
    "train": "fine-tune one method on one task and log it to MLflow",
    "bench": "measure callback overhead and hard-mode CPU speedup; writes reports/bench/",
    "sweep": "trace the accuracy-vs-FLOPs Pareto front of a method with Optuna, logged to MLflow",
    "report": "Pareto plots and a comparison table of a task's sweeps: reports/<task>/ and MLflow",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokprune",
        description="Token pruning for BERT-style encoders.",
        epilog="example: python -m tokprune train method=none task=sst2 budget=cpu train.lr=3e-5",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("overrides", nargs="*", metavar="key=value",
                         help="group choices (method= task= model= budget=) and dotted keys (train.lr=3e-5)")
    return parser


def cmd_train(overrides: list[str]) -> int:
    from tokprune.config import compose
    from tokprune.train import train

    cfg = compose(overrides)
    result = train(cfg)
    from tokprune.data import get_task

    best = result.best
    metrics = "  ".join(f"{m}={best[f'val/{m}']:.4f}" for m in get_task(cfg.task.name).metrics)
    kept = " ".join(f"{best[k]:.2f}" for k in sorted(best) if k.startswith("val/kept_fraction/"))
    print(f"run {result.run_id} ({cfg.method.name} {cfg.task.name} {cfg.model.name} {cfg.budget.name})")
    print(f"best dev: {metrics}")
    print(
        f"dev FLOPs (fvcore, 1 MAC = 1 FLOP): ratio {best['val/flops_ratio_real']:.3f} vs unpruned at real length, "
        f"{best['val/flops_ratio_padded']:.3f} vs padded to {cfg.task.max_length}; kept fraction per layer: {kept}"
    )
    print(
        f"train rows {result.train_rows}, dev rows {result.eval_rows}, epochs {result.epochs}, "
        f"steps {result.steps}, fit {result.seconds:.0f} s"
    )
    print(f"checkpoint {result.checkpoint}")
    print(f"MLflow store {result.tracking_uri} (make ui)")
    return 0


def cmd_bench(overrides: list[str]) -> int:
    from pathlib import Path

    from tokprune.bench import run_bench, summary
    from tokprune.config import compose

    cfg = compose(overrides)
    out_dir = Path("reports") / "bench"
    print(summary(run_bench(cfg, out_dir)))
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return 0


def cmd_sweep(overrides: list[str]) -> int:
    from tokprune.sweep import run_sweep

    return run_sweep(overrides)


def cmd_report(overrides: list[str]) -> int:
    from tokprune.report import run_report

    return run_report(overrides)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return globals()[f"cmd_{args.command}"](args.overrides)
    except UsageError as exc:
        print(f"tokprune: error: {exc}", file=sys.stderr)
        return 2
