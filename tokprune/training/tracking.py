"""MLflow plumbing: where the store is and the Lightning logger that writes to it."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from mlflow.entities import Dataset, DatasetInput, InputTag, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from tokprune.config import flat_params
from tokprune.core.liveness import HOST, alive, owner


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute so every process finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def store_dir(uri: str) -> Path | None:
    """The folder of a SQLite store (artifacts, the sweep journal and reports go beside it);
    None for a tracking server."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]).parent if uri.startswith(prefix) else None


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store (``mlartifacts/``); the server decides otherwise."""
    folder = store_dir(uri)
    return (folder / "mlartifacts").as_uri() if folder else None


def run_name(cfg: DictConfig) -> str:
    return cfg.mlflow.run_name or f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}-{cfg.budget.name}"


def reap_dead_runs(client: MlflowClient, experiment_id: str, stale_hours: float) -> list[str]:
    """Mark FAILED the RUNNING runs of the experiment whose process is gone: its owner tags (host,
    pid, pid_start: every run tokprune opens carries them) name this host and a process that no
    longer runs; a run of another host, or one without owner tags, only once it started more than
    ``stale_hours`` ago. A process killed with ``kill -9`` cannot close its own run: the next
    command on the store does. Returns the run ids it closed."""
    closed = []
    now = time.time() * 1000
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get("pid", "")
        if tags.get("host") == HOST and pid.isdigit():
            dead = not alive(int(pid), tags.get("pid_start") or None)
            why = f"its process (pid {pid} on {HOST}) is gone"
        else:
            dead = now - run.info.start_time > stale_hours * 3600 * 1000
            why = (
                f"it has been RUNNING for more than mlflow.stale_hours={stale_hours:g} and its process is not "
                "on this host"
            )
        if dead:
            client.set_tag(run.info.run_id, "failure", why)
            client.set_terminated(run.info.run_id, status="FAILED")
            closed.append(run.info.run_id)
    return closed


def reap_store(cfg: DictConfig) -> list[str]:
    """``reap_dead_runs`` on the configured store's experiment, if it exists; never fails a command."""
    try:
        client = MlflowClient(resolve_tracking_uri(cfg.mlflow.tracking_uri))
        experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            return []
        closed = reap_dead_runs(client, experiment.experiment_id, float(cfg.mlflow.stale_hours))
    except Exception:  # an unreachable store is reported by whoever opens a run on it
        return []
    for run_id in closed:
        print(f"MLflow run {run_id} was left RUNNING by a process that is gone: marked FAILED")
    return closed


def run_tags(cfg: DictConfig, role: str) -> dict[str, str]:
    """The tags every run carries, so the runs table reads without opening a run: method, task,
    model, budget, seed, protocol (``-`` for ``none``, which follows none) and role (baseline,
    train, trial, sweep, eval or repeat)."""
    protocol = "-" if cfg.method.name == "none" else str(cfg.get("protocol", {}).get("name", "paper"))
    return {
        "method": cfg.method.name,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "budget": cfg.budget.name,
        "seed": str(cfg.seed),
        "protocol": protocol,
        ROLE: role,
    }


def log_training_data(logger: MLFlowLogger, cfg: DictConfig, rows: int, eval_rows: int) -> None:
    """The data a run trained and validated on as MLflow dataset inputs (the runs table's Dataset
    column): the task's train and dev splits, their row counts and where they were read from."""
    source = cfg.data.glue_dir or f"hub:{cfg.data.hub_dataset}"
    inputs = []
    for split, count, context in (("train", rows, "training"), ("dev", eval_rows, "validation")):
        profile = json.dumps({"split": split, "rows": count, "seed": cfg.seed})
        digest = hashlib.sha256(f"{cfg.task.name}|{split}|{count}|{cfg.seed}|{source}".encode()).hexdigest()[:8]
        dataset = Dataset(
            name=f"{cfg.task.name}/{split}",
            digest=digest,
            source_type="local" if cfg.data.glue_dir else "hub",
            source=json.dumps({"glue_dir" if cfg.data.glue_dir else "hub": source}),
            profile=profile,
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    logger.experiment.log_inputs(logger.run_id, datasets=inputs)


def runs_view(uri: str, experiment: str = "tokprune", port: int = 5000) -> str:
    """What ``make ui`` prints: the URL of the experiment's runs table (MLflow 3 opens an
    experiment on its GenAI traces page otherwise) and what to show in it."""
    try:
        found = MlflowClient(resolve_tracking_uri(uri)).get_experiment_by_name(experiment)
    except Exception:
        found = None
    where = (
        f"http://127.0.0.1:{port}/#/experiments/{found.experiment_id}/runs"
        if found
        else (f"http://127.0.0.1:{port} (no experiment '{experiment}' yet: train something first)")
    )
    return (
        f"runs table: {where}\n"
        "  columns: Metrics > best/main (every task's main dev metric) and best/flops_ratio_real; "
        "tags method, task, protocol, role, seed are columns already\n"
        "  one study's front: search  tags.pareto = 'true' and tags.study = '<study name>'"
    )


def make_logger(cfg: DictConfig, tags: dict[str, str] | None = None) -> MLFlowLogger:
    """An MLFlowLogger on the configured store, with the resolved config logged as params; the
    run records its owner (host, pid) so a later command can tell whether it still runs."""
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    reap_store(cfg)
    logger = MLFlowLogger(
        experiment_name=cfg.mlflow.experiment,
        run_name=run_name(cfg),
        tracking_uri=uri,
        tags={**run_tags(cfg, "train"), **owner(), **(tags or {})},
        artifact_location=artifact_root(uri),
    )
    logger.log_hyperparams(flat_params(cfg))
    return logger


def mark_failed(logger: MLFlowLogger, waits: tuple[float, ...] = (0.5, 2.0, 5.0)) -> None:
    """Close the logger's run as FAILED after an error or a signal. A store that is busy for a
    moment (SQLite's "database is locked" on a loaded machine) is retried; one that stays busy
    leaves the run to the next command's reaper (``reap_dead_runs``: its owner is dead) with a
    one-line warning, so the error that stopped training, and a signal's exit code, stay the
    ones the user sees."""
    for wait in (*waits, None):
        try:
            logger.finalize("failed")
            return
        except MlflowException as exc:
            if wait is None:
                print(
                    f"tokprune: warning: MLflow run {logger.run_id} could not be marked FAILED "
                    f"({str(exc).splitlines()[0][:120]}); the next command on this store marks it",
                    file=sys.stderr,
                )
                return
            time.sleep(wait)


# -- finding runs by their tags (baselines here; sweep parents and trials in search.records) --------

ROLE = "role"  # baseline | train | trial | sweep | eval | repeat
LEGACY_ROLE = "tokprune.role"  # the same tag as stores written before it was renamed call it


PARENT = "mlflow.parentRunId"


def quoted(value: str) -> str:
    if "'" in value:
        return '"' + value + '"'
    return "'" + value + "'"


def where(tags: dict[str, str], status: str | None = None) -> str:
    terms = [f"tags.`{k}` = {quoted(str(v))}" for k, v in tags.items()]
    if status:
        terms.append(f"attributes.status = '{status}'")
    return " and ".join(terms)


def search(client: MlflowClient, experiment_id: str, filter_string: str, oldest_first: bool = True) -> list[Run]:
    """Every run that matches, across pages."""
    runs, token = [], None
    order = ["attributes.start_time ASC" if oldest_first else "attributes.start_time DESC"]
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, order_by=order, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def find_baseline(client: MlflowClient, exp_id: str, key: dict[str, str]) -> Run | None:
    found = search(client, exp_id, where({ROLE: "baseline", **key}, status="FINISHED")) or search(
        client, exp_id, where({LEGACY_ROLE: "baseline", **key}, status="FINISHED")
    )
    return found[0] if found else None
