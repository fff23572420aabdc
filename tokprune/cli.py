"""``python -m tokprune <command> key=value ...``

Every bad input ends in one line on stderr and exit code 2. Anything else that goes wrong
is one line too, exit code 1, with the full traceback appended to ``tokprune-error.log`` in
the working folder (the system's temp folder if that is not writable): a user sees what
failed, a bug report has the details. SIGINT (Ctrl-C) and SIGTERM stop any command with one
line and exit code 130 and 143 (128 + the signal), an open MLflow run marked FAILED.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import traceback
from datetime import datetime
from pathlib import Path

from tokprune.errors import Stopped, UsageError

COMMANDS = {
    "train": "fine-tune one method on one task and log it to MLflow",
    "bench": "measure callback overhead, hard-mode CPU speedup, training steps and torch vs ONNX Runtime latency; "
    "writes reports/bench/",
    "sweep": "trace the accuracy-vs-FLOPs Pareto front of a method with Optuna, logged to MLflow",
    "repeat": "train a finished sweep trial's settings again with more seeds (its mean and spread in the report)",
    "report": "Pareto plots and a comparison table of a task's sweeps: reports/<task>/ and MLflow",
    "eval": "dev metrics, FLOPs, kept tokens per layer and CPU latency of a trained checkpoint "
    "(hard mode, or eval.computation=soft|training)",
    "predict": "label the sentences or pairs of a file with a trained checkpoint (hard mode)",
    "export": "export a trained checkpoint to ONNX with its pruning decisions and real token removal in the graph",
}
#: Commands with name=value arguments of their own (not config keys), and what they take.
ARGUMENTS_HELP = {
    "eval": "checkpoint=PATH [engine=torch|onnx] [quantize=int8 (engine=onnx)], then data.glue_dir= "
    "data.eval_subset= data.num_workers= train.eval_batch_size= mlflow.tracking_uri= eval.latency_examples= "
    "eval.computation=hard|soft|training",
    "predict": "checkpoint=PATH input=FILE output=FILE [batch_size=N] [engine=torch|onnx] [quantize=int8]",
    "export": "checkpoint=PATH [output=FILE.onnx] [quantize=int8] [fused=true|false] (default output: "
    "<checkpoint>.onnx or <checkpoint>.int8.onnx, which engine=onnx reuses)",
    "repeat": "trial=N (or target=X: the trial nearest that FLOPs target) seeds=K, then the sweep's own arguments "
    "(method= task= budget= protocol= ...)",
    "bench": "[only=speedup,layers,callback,engines,lengths,steps] (the other sections are kept from bench.json), then "
    "group choices (model= seed=) and dotted keys (data.glue_dir=)",
}
PLACEHOLDERS = {
    "checkpoint": "PATH",
    "input": "FILE",
    "output": "FILE",
    "batch_size": "N",
    "engine": "torch|onnx",
    "quantize": "int8",
    "fused": "true|false",
    "only": "SECTIONS",
    "trial": "N",
    "target": "X",
    "seeds": "K",
}
ERROR_LOG = "tokprune-error.log"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokprune",
        description="Token pruning for BERT-style encoders.",
        epilog="example: python -m tokprune train method=none task=sst2 budget=cpu train.lr=3e-5",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help=ARGUMENTS_HELP.get(
                name, "group choices (method= task= model= budget=) and dotted keys (train.lr=3e-5)"
            ),
        )
    return parser


def cmd_train(overrides: list[str]) -> int:
    from tokprune.config import compose
    from tokprune.training.train import train

    cfg = compose(overrides)
    result = train(cfg)
    if result.global_rank:  # under DDP, rank 0 prints the summary
        return 0
    from tokprune.core.data import get_task

    best = result.best
    metrics = "  ".join(f"{m}={best[f'val/{m}']:.4f}" for m in get_task(cfg.task.name).metrics)
    kept = " ".join(f"{best[k]:.2f}" for k in sorted(best) if k.startswith("val/kept_fraction/"))
    print(f"run {result.run_id} ({cfg.method.name} {cfg.task.name} {cfg.model.name} {cfg.budget.name})")
    print(f"best dev: {metrics}")
    if result.selection is not None and result.selection.note:
        print(f"note: {result.selection.note}")
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


def cmd_bench(words: list[str]) -> int:
    from pathlib import Path

    found, overrides = _arguments("bench", words, (), ("only",))
    from tokprune.config import compose
    from tokprune.reporting.bench import run_bench, summary

    cfg = compose(overrides)
    out_dir = Path("reports") / "bench"
    only = tuple(found["only"].split(",")) if "only" in found else None
    results = run_bench(cfg, out_dir, only=only)
    print(summary(results))
    written = [name for name in ("bench.json", "bench.png", "engines.png", "lengths.png") if (out_dir / name).is_file()]
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    return 0


def cmd_sweep(overrides: list[str]) -> int:
    from tokprune.reporting.report import after_sweep
    from tokprune.search.sweep import run_sweep

    outcome = run_sweep(overrides)
    if outcome.report_args is not None:
        after_sweep(outcome.report_args, outcome.say)  # the task's report; never fails the sweep
    return outcome.code


def cmd_repeat(words: list[str]) -> int:
    found, overrides = _arguments("repeat", words, ("seeds",), ("trial", "target"))
    from tokprune.search.repeat import repeat_trial

    numbers = {}
    for name, kind, what in (
        ("trial", int, "a whole number"),
        ("seeds", int, "a whole number"),
        ("target", float, "a number"),
    ):
        if name in found:
            try:
                numbers[name] = kind(found[name])
            except ValueError:
                raise UsageError(f"{name}={found[name]}: expected {what}") from None
    return repeat_trial(overrides, numbers.get("trial"), numbers["seeds"], numbers.get("target"))


def cmd_report(overrides: list[str]) -> int:
    from tokprune.reporting.report import run_report

    return run_report(overrides)


def _arguments(command: str, words: list[str], required: tuple[str, ...], optional: tuple[str, ...] = ()):
    """(the command's own ``name=value`` arguments, the other words): these are not config keys."""
    found, rest = {}, []
    for word in words:
        name, sep, value = word.partition("=")
        if sep and name in required + optional:
            if not value:
                raise UsageError(f"{name}= is empty: give {name}={PLACEHOLDERS[name]}")
            found[name] = value
        else:
            rest.append(word)
    missing = [name for name in required if name not in found]
    if missing:
        raise UsageError(f"{command} needs {' '.join(f'{n}={PLACEHOLDERS[n]}' for n in missing)}")
    return found, rest


def cmd_eval(words: list[str]) -> int:
    found, settings = _arguments("eval", words, ("checkpoint",), ("engine", "quantize"))
    from tokprune.serving.evaluate import evaluate, summary

    engine, quantize = found.get("engine", "torch"), found.get("quantize")
    print(summary(evaluate(found["checkpoint"], settings, engine=engine, quantize=quantize)))
    return 0


def cmd_predict(words: list[str]) -> int:
    found, rest = _arguments("predict", words, ("checkpoint", "input", "output"), ("batch_size", "engine", "quantize"))
    if rest:
        raise UsageError(f"predict takes {ARGUMENTS_HELP['predict']}, not '{rest[0]}'")
    batch_size = found.get("batch_size", "32")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise UsageError(f"bad value for batch_size: '{batch_size}' (expected an integer >= 1)")
    from tokprune.serving.predict import run_predict

    print(
        run_predict(
            found["checkpoint"],
            found["input"],
            found["output"],
            int(batch_size),
            engine=found.get("engine", "torch"),
            quantize=found.get("quantize"),
        )
    )
    return 0


def cmd_export(words: list[str]) -> int:
    found, rest = _arguments("export", words, ("checkpoint",), ("output", "quantize", "fused"))
    if rest:
        raise UsageError(f"export takes {ARGUMENTS_HELP['export']}, not '{rest[0]}'")
    fused = found.get("fused", "true").lower()
    if fused not in ("true", "false"):
        raise UsageError(f"fused must be true or false, not '{found['fused']}'")
    from tokprune.serving.export import run_export

    print(run_export(found["checkpoint"], found.get("output"), found.get("quantize"), fused=fused == "true"))
    return 0


def _save_traceback(argv: list[str]) -> Path | None:
    """Append the exception being handled to the error log; where it went, or None."""
    text = (
        f"--- {datetime.now().isoformat(timespec='seconds')} pid {os.getpid()}: tokprune {' '.join(argv)}\n"
        f"{traceback.format_exc()}"
    )
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            with (folder / ERROR_LOG).open("a", encoding="utf-8") as log:
                log.write(text)
            return (folder / ERROR_LOG).resolve()
        except OSError:
            continue
    return None


#: Code a signal does not cut into: a store's statement interrupted there keeps its SQLite lock,
#: and closing the run as FAILED then fails on "database is locked" (exit 1, not 128 + signum).
STORE_MODULES = ("sqlalchemy", "sqlite3", "mlflow.store", "optuna.storages")


def _in_store_code(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORE_MODULES):
            return True
        frame = frame.f_back
    return False


#: Set while a command runs under ``_stop``: a deferred signal is sent again only then (once the
#: command has ended, the default handler is back and would kill the process).
_ARMED = threading.Event()


def _send_again(signum) -> None:
    if _ARMED.is_set():
        os.kill(os.getpid(), signum)


def _stop(signum, frame):
    if _in_store_code(frame):  # the same signal again in a moment, once the statement is done
        again = threading.Timer(0.05, _send_again, (signum,))
        again.daemon = True
        again.start()
        return
    raise Stopped(signum)


def _run(command: str, overrides: list[str]) -> int:
    """The command; Lightning's own SIGTERM flag (its handler sees the signal before ours, and
    acts on it first when ours was deferred) ends it as our SIGTERM does."""
    try:
        return globals()[f"cmd_{command}"](overrides)
    except SystemExit as exc:
        if type(exc).__name__ == "SIGTERMException":  # lightning.pytorch.utilities.exceptions
            raise Stopped(signal.SIGTERM) from exc
        raise


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    _ARMED.set()
    try:
        return _run(args.command, args.overrides)
    except Stopped as stop:
        _ARMED.clear()
        for s in STOP_SIGNALS:  # a second signal must not interrupt the message
            signal.signal(s, signal.SIG_IGN)
        print(
            f"tokprune: stopped by {stop}: exit code {stop.exit_code} (an open MLflow run was marked FAILED)",
            file=sys.stderr,
        )
        return stop.exit_code
    except UsageError as exc:
        print(f"tokprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a failure outside the user's input: one line here, details in the log
        log = _save_traceback(argv)
        message = (str(exc).strip().splitlines() or [""])[0]
        where = f"full traceback in {log}" if log else "no traceback file could be written"
        print(f"tokprune: error: {type(exc).__name__}{': ' + message if message else ''} ({where})", file=sys.stderr)
        return 1
    finally:
        _ARMED.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)
