"""The sweep's records: one MLflow parent run per study, its trial children, the baseline,
and the Pareto-front table that is printed after each trial and kept on the parent run.

Runs are found by tags, never remembered in a file, so any process (a resumed sweep, a
second worker, another machine on the same tracking server) finds the same ones:

- parent: ``tokprune.role=sweep``, ``study=<name>``, ``storage=<where the study lives>``,
  ``sweep_id=<a random id kept in the study>`` (a study deleted and started again gets a new parent)
- trial child: ``mlflow.parentRunId=<parent>``, ``tokprune.role=trial``, ``trial=<number>``
- baseline: ``tokprune.role=baseline`` with ``task``, ``model``, ``budget``, ``seed``
"""

from __future__ import annotations

import csv
import io

import optuna
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tokprune.search.plan import FLOPS, Plan, param_strings
from tokprune.training.tracking import PARENT, ROLE, search, where


def parent_run(client: MlflowClient, exp_id: str, tags: dict[str, str], run_name: str) -> str:
    """The study's parent run: found by its tags, created on the first run of the sweep."""
    key = {ROLE: "sweep", "study": tags["study"], "storage": tags["storage"], "sweep_id": tags["sweep_id"]}
    found = search(client, exp_id, where(key))
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    mine = client.create_run(exp_id, run_name=run_name, tags={**tags, **key}).info.run_id
    # Two processes may create one each at once (no lock across machines): the oldest wins.
    first = search(client, exp_id, where(key))[0].info.run_id
    if first != mine:
        client.delete_run(mine)
    return first


def child_runs(client: MlflowClient, exp_id: str, parent_id: str, **tags: str) -> list[Run]:
    return search(client, exp_id, where({PARENT: parent_id, **tags}))


def close_trial_runs(
    client: MlflowClient, exp_id: str, parent_id: str, number: int, status: str, replace: tuple[str, ...] = ("RUNNING",)
) -> list[str]:
    """Set the status of one trial's child runs that are in one of the ``replace`` states: open
    runs of a failed trial; for a stale trial its finished run too (the trial was never told)."""
    closed = []
    for run in child_runs(client, exp_id, parent_id, trial=str(number)):
        if run.info.status in replace:
            client.set_terminated(run.info.run_id, status=status)
            client.set_tag(run.info.run_id, "trial_state", "FAIL")
            closed.append(run.info.run_id)
    return closed


def close_orphans(client: MlflowClient, exp_id: str, parent_id: str, running: set[int]) -> list[str]:
    """Open child runs whose trial is no longer running (its process died): mark them KILLED."""
    closed = []
    for run in child_runs(client, exp_id, parent_id):
        number = run.data.tags.get("trial")
        if run.info.status == "RUNNING" and (number is None or int(number) not in running):
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "trial_state", "FAIL")
            closed.append(run.info.run_id)
    return closed


def tag_pareto(client: MlflowClient, exp_id: str, parent_id: str, front: dict[int, str]) -> None:
    """``pareto=true`` on the runs of the Pareto-optimal trials (``front``: number -> run id),
    ``pareto=false`` on every other child, so the UI can filter ``tags.pareto = 'true'``."""
    for run in child_runs(client, exp_id, parent_id):
        on_front = front.get(int(run.data.tags.get("trial", -1))) == run.info.run_id
        value = "true" if on_front else "false"
        if run.data.tags.get("pareto") != value:
            client.set_tag(run.info.run_id, "pareto", value)


def front_table(study: optuna.Study, plan: Plan, baseline: dict) -> str:
    """The Pareto-optimal trials so far, fewest FLOPs first, and the unpruned baseline."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    lines = [
        f"Pareto front, {len(complete)}/{plan.target} trials complete "
        f"({plan.main_metric} up, {FLOPS} down; study {plan.study_name}):",
        f"  {'trial':>8}  {plan.main_metric:>10}  {FLOPS:>16}  params",
    ]
    for t in sorted(study.best_trials if complete else [], key=lambda t: t.values[1]):
        lines.append(
            f"  {t.number:>8}  {t.values[0]:>10.4f}  {t.values[1]:>16.3f}  {' '.join(param_strings(t.params))}"
        )
    if baseline:
        lines.append(
            f"  {'baseline':>8}  {baseline['metric']:>10.4f}  {baseline['flops']:>16.3f}  "
            f"method=none (run {baseline['run_id']})"
        )
    return "\n".join(lines)


def log_summary(
    client: MlflowClient, parent_id: str, study: optuna.Study, plan: Plan, baseline: dict, front: dict[int, str]
) -> None:
    """The parent's summary, rewritten each time: ``sweep/trials.csv`` (every trial and the
    baseline), ``sweep/summary.md`` (the front), counts as metrics, the front as a tag."""
    trials = study.get_trials(deepcopy=False)
    columns = [
        "trial",
        "state",
        "pareto",
        plan.main_metric,
        FLOPS,
        "flops_ratio_padded",
        *(p.key for p in plan.space.params),
        "mlflow_run_id",
        "error",
    ]
    rows = [
        {
            "trial": "baseline",
            "state": "COMPLETE",
            "pareto": "",
            plan.main_metric: baseline["metric"],
            FLOPS: baseline["flops"],
            "mlflow_run_id": baseline["run_id"],
        }
    ]
    for t in trials:
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "pareto": t.number in front,
                plan.main_metric: t.values[0] if t.values else "",
                FLOPS: t.values[1] if t.values else "",
                "flops_ratio_padded": t.user_attrs.get("best/flops_ratio_padded", ""),
                **t.params,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id") or "",
                "error": t.user_attrs.get("error") or "",
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    client.log_text(parent_id, buffer.getvalue(), "sweep/trials.csv")
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    client.log_text(
        parent_id,
        f"# Sweep {plan.study_name}\n\n{complete}/{plan.target} trials complete, {failed} "
        f"failed. Storage: {plan.storage_label}\n\n```\n{front_table(study, plan, baseline)}\n```\n",
        "sweep/summary.md",
    )
    client.set_tag(parent_id, "pareto_trials", ",".join(map(str, sorted(front))))
    points = [t.values for t in trials if t.number in front and t.values]
    if points:  # the front at a glance in the runs table: its best point and its cheapest
        best = max(points, key=lambda v: (v[0], -v[1]))
        cheapest = min(points, key=lambda v: (v[1], -v[0]))
        for key, value in {
            "best/main": best[0],
            "best/flops_ratio_real": best[1],
            "front/fewest_flops_ratio_real": cheapest[1],
            "front/main_at_fewest_flops": cheapest[0],
        }.items():
            client.log_metric(parent_id, key, value)
    client.set_tag(parent_id, "trials", str(plan.target))
    for key, value in {"sweep/complete": complete, "sweep/failed": failed, "sweep/pareto": len(front)}.items():
        client.log_metric(parent_id, key, value)
