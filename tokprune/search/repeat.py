"""Seed repeats of a finished sweep trial (``python -m tokprune repeat ... trial=N seeds=K``).

A front drawn from one seed per point cannot say whether one method beats another: the gap may
be seed noise. ``repeat`` trains a complete trial's exact settings (its sampled values, the
sweep's command, the same baseline checkpoint as start and teacher) again with the next ``K``
seeds (``seed + 1 .. seed + K``): the seed changes the training rows' order (and, where the
training set is subsampled, which rows), the method's own initialisation, dropout and any
sampling. Each repeat is an MLflow child run of the study's parent (tags ``tokprune.role=repeat``,
``repeat_of=<trial>``, ``seed``) and is recorded in the study (user attribute ``repeats``:
trial -> [{seed, metric, flops_real, flops_padded, run_id, checkpoint}]), so ``report`` shows the
trial's mean and spread over seeds and ``report.json`` carries them. A seed already repeated is
skipped, so the same command resumes. ``target=X`` instead of ``trial=N`` names the complete trial
whose ``protocol.target_flops`` is nearest X (the grid's trial at that target, in any study).
"""

from __future__ import annotations

import statistics

import optuna
from optuna.trial import TrialState

from tokprune.config import compose
from tokprune.errors import UsageError
from tokprune.search.plan import FLOPS, plan_sweep
from tokprune.search.results import TARGET_KEY
from tokprune.search.sweep import Sweep
from tokprune.training.tracking import PARENT, ROLE
from tokprune.training.train import train

REPEATS = "repeats"  # the study's user attribute: str(trial number) -> list of repeat records


def trial_at_target(study: optuna.Study, target: float) -> int:
    """The complete trial whose ``protocol.target_flops`` is nearest ``target`` (with several at the
    same target, the one with the most repeats, then the earliest: the report's choice too); a
    one-line error when no complete trial trained to a target."""
    held = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if TARGET_KEY in t.params]
    if not held:
        raise UsageError(
            f"study {study.study_name} has no complete trial with a {TARGET_KEY} (run the sweep first, "
            f"or name the trial: trial=N)"
        )
    repeats = study.user_attrs.get(REPEATS, {})
    return min(
        held, key=lambda t: (abs(t.params[TARGET_KEY] - target), -len(repeats.get(str(t.number), [])), t.number)
    ).number


def repeat_trial(args: list[str], trial_number: int | None, seeds: int, target: float | None = None) -> int:
    """Train trial ``trial_number`` (or the one nearest ``target``) of the study ``args`` name with
    ``seeds`` more seeds."""
    if seeds < 1:
        raise UsageError(f"seeds must be a positive number of extra seeds, not {seeds}")
    if (trial_number is None) == (target is None):
        raise UsageError("repeat needs one of trial=N or target=X (the trial nearest that protocol.target_flops)")
    if target is not None and not 0 < target <= 1:
        raise UsageError(f"target={target}: expected a FLOPs ratio in (0, 1]")
    plan = plan_sweep(args)
    sweep = Sweep(plan, label=" repeat")
    study = sweep.setup()
    if trial_number is None:
        trial_number = trial_at_target(study, target)
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == trial_number), None)
    if trial is None or trial.state != TrialState.COMPLETE:
        complete = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        raise UsageError(
            f"study {plan.study_name} has no complete trial {trial_number}: complete trials are "
            f"{', '.join(map(str, complete)) or 'none'} (run the sweep first)"
        )
    if target is not None:
        held = trial.params[TARGET_KEY]
        sweep.say(
            f"trial {trial_number} (its {TARGET_KEY}={held:g}) is the complete trial nearest {target:g}"
            + ("" if abs(held - target) < 1e-9 else ": none trained to that target yet")
        )
    main = plan.main_metric
    for seed in [plan.cfg.seed + i for i in range(1, seeds + 1)]:
        recorded = study.user_attrs.get(REPEATS, {}).get(str(trial_number), [])
        if seed in {r["seed"] for r in recorded}:
            sweep.say(f"trial {trial_number}, seed {seed}: repeated already")
            continue
        sweep.say(f"trial {trial_number} again with seed {seed}")
        cfg = compose(
            [
                *sweep.trial_arguments(dict(trial.params)),
                f"seed={seed}",
                f"mlflow.run_name={plan.study_name}-trial{trial_number}-seed{seed}",
            ]
        )
        cfg.sweep.storage = plan.storage_label
        tags = {
            PARENT: sweep.parent_id,
            ROLE: "repeat",
            "repeat_of": str(trial_number),
            "study": plan.study_name,
            "seed": str(seed),
        }
        result = train(cfg, tags=tags)
        record = {
            "seed": seed,
            "metric": result.best.get(f"val/{main}"),
            "flops_real": result.best.get(f"val/{FLOPS}"),
            "flops_padded": result.best.get("val/flops_ratio_padded"),
            "run_id": result.run_id,
            "checkpoint": result.checkpoint,
        }
        with sweep.gate:  # other processes may record their repeats of this study meanwhile
            study = sweep.load()
            repeats = dict(study.user_attrs.get(REPEATS, {}))
            repeats[str(trial_number)] = [*repeats.get(str(trial_number), []), record]
            study.set_user_attr(REPEATS, repeats)
        sweep.say(
            f"trial {trial_number}, seed {seed}: {main}={record['metric']:.4f} {FLOPS}={record['flops_real']:.3f}"
        )
    records = study.user_attrs.get(REPEATS, {}).get(str(trial_number), [])
    metrics = [trial.values[0], *(r["metric"] for r in records)]
    flops = [trial.values[1], *(r["flops_real"] for r in records)]
    spread = statistics.stdev(metrics) if len(metrics) > 1 else 0.0
    sweep.say(
        f"trial {trial_number} over {len(metrics)} seeds: {main} {statistics.mean(metrics):.4f} +- {spread:.4f} "
        f"(std), {FLOPS} {statistics.mean(flops):.3f} +- {statistics.stdev(flops) if len(flops) > 1 else 0.0:.3f}"
    )
    return 0
