"""`tokprune report`: Pareto plots, the comparison table and the HTML page of a task's sweeps.

The recorded studies are real tiny sweeps (model=tiny, budget=smoke, real SST-2 rows): a
transkimmer study whose space also samples the predictors' initial keep bias and the lr, so
trials keep different numbers of tokens (a random tiny model learns nothing in 4 steps), and
a method=none study over the lr, so the overlay has two methods.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from PIL import Image

from tokprune.cli import main
from tokprune.reporting.collect import operating_points
from tokprune.reporting.render import operating_rows, speedup_cell, table_rows
from tokprune.reporting.report import after_sweep
from tokprune.search.results import MethodResult, Point, distinct_baselines

from conftest import GLUE, QQP_SAMPLE, ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXAMPLES = 8  # dev rows timed for each operating point: enough to exercise the code
SPACES = {
    "transkimmer": "trials: {smoke: 4}\nparams:\n"
    "  method.skim_lambda: {distribution: float, low: 0.05, high: 2.0, log: true}\n"
    "  method.keep_bias: {distribution: float, low: -0.3, high: 0.3}\n"
    "  train.lr: {distribution: float, low: 1.0e-4, high: 1.0e-2, log: true}\n",
    "none": "trials: {smoke: 2}\nparams:\n  train.lr: {distribution: float, low: 1.0e-5, high: 1.0e-3, log: true}\n",
}
FILES = {
    "pareto_all.png",
    "pareto_none.png",
    "pareto_transkimmer.png",
    "kept_none.png",
    "kept_transkimmer.png",
    "pareto.md",
    "report.html",
    "report.json",
}


def common(store: Path) -> list[str]:
    return [
        "task=sst2",
        "model=tiny",
        "budget=smoke",
        "protocol=paper",
        f"data.glue_dir={GLUE}:{QQP_SAMPLE}",
        f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db",
    ]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """Two real tiny sweeps in one tmp store; each ends by writing the report beside the store."""
    if not GLUE.is_dir():
        pytest.skip(f"real GLUE data not found at {GLUE}")
    store = tmp_path_factory.mktemp("recorded")
    (store / "space").mkdir()
    for method, text in SPACES.items():
        (store / "space" / f"{method}.yaml").write_text(text)
    for method in SPACES:
        args = [
            f"method={method}",
            *common(store),
            "data.eval_subset=64",
            f"train.checkpoint_dir={store}/ckpt",
            f"sweep.space_dir={store}/space",
            f"report.speedup_examples={EXAMPLES}",
        ]
        assert main(["sweep", *args]) == 0
    return store


def studies(store: Path) -> dict[str, optuna.Study]:
    storage = JournalStorage(JournalFileBackend(str(store / "optuna.journal")))
    return {m: optuna.load_study(study_name=f"{m}-sst2-tiny-smoke-seed42", storage=storage) for m in SPACES}


def table(md: str, heading: str = "Pareto points") -> list[list[str]]:
    """The rows of the Markdown table under ``## <heading>``."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines[1:]]


def report(store: Path, out: Path, *extra: str) -> int:
    return main(["report", *common(store), f"report.dir={out}", f"report.speedup_examples={EXAMPLES}", *extra])


# -- operating points, on made-up fronts --------------------------------------------------


def made_up(method: str, points: list[tuple[float, float]], baseline: float = 0.85) -> MethodResult:
    """A study whose complete trials are (metric, FLOPs ratio) pairs, numbered in order."""
    front = {
        i for i, (m, f) in enumerate(points) if not any(m2 >= m and f2 <= f and (m2, f2) != (m, f) for m2, f2 in points)
    }
    return MethodResult(
        method=method,
        label=method,
        study=f"{method}-study",
        parent_run_id=None,
        overrides=[],
        points=[Point(i, {}, m, f, None, [], None, i in front) for i, (m, f) in enumerate(points)],
        baseline={"run_id": "b" * 32, "metric": baseline},
    )


def test_operating_points_are_read_off_the_front():
    r = made_up(
        "gate", [(0.852, 0.90), (0.845, 0.62), (0.841, 0.55), (0.80, 0.48), (0.70, 0.30), (0.75, 0.49), (0.79, 0.70)]
    )
    assert operating_points(r, flops_budget=0.5, tolerance=0.01) == {
        "best": 0,
        "within_flops": 3,
        "near_baseline": 2,
    }  # 0.841 >= 0.85 - 0.01; 0.80 beats 0.75 under 0.5
    assert operating_points(r, flops_budget=0.2, tolerance=0.001) == {
        "best": 0,
        "within_flops": None,
        "near_baseline": 0,
    }


def test_the_trials_timed_are_the_operating_points_then_one_per_timed_target():
    from tokprune.reporting.report import timed_trials

    r = made_up("top", [(0.84, 0.90), (0.83, 0.52), (0.80, 0.41), (0.78, 0.30)])
    for p, target in zip(r.points, [None, 0.5, 0.4, 0.3]):
        p.params = {} if target is None else {"protocol.target_flops": target}
    r.operating = operating_points(r, flops_budget=0.5, tolerance=0.01)
    assert r.operating == {"best": 0, "within_flops": 2, "near_baseline": 0}
    assert timed_trials(r, [0.5]) == [0, 2, 1]  # trial 1 trained to 0.5 but measured 0.52: timed as well
    assert timed_trials(r, [0.4, 0.7]) == [0, 2]  # 0.4's trial is already an operating point; none at 0.7
    assert timed_trials(r, []) == [0, 2]


def test_timed_targets_outside_0_1_is_one_line_exit_2(tmp_path, capsys):
    line = one_line_error(capsys, ["report.timed_targets=[0.5,2]", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert "bad value for report.timed_targets: [0.5, 2] (expected a list of FLOPs targets in (0, 1]" in line


def test_each_operating_point_is_set_beside_static_at_no_more_flops():
    static = made_up("static", [(0.85, 1.0), (0.83, 0.60), (0.78, 0.53), (0.63, 0.38)])
    gate = made_up("gate", [(0.84, 0.57), (0.80, 0.45)])
    for r in (static, gate):
        r.operating = operating_points(r, 0.5, 0.01)
    names = {"best": "best", "within_flops": "<=0.5", "near_baseline": "near"}
    rows = {(row[0], row[1]): row for row in operating_rows([gate, static], names)}
    assert rows["gate", "best"][2:7] == ["0", "0.8400", "-0.0100", "0.5700", "0.7800"]  # static's 0.78 at 0.53
    assert rows["gate", "<=0.5"][2:7] == ["1", "0.8000", "-0.0500", "0.4500", "0.6300"]
    assert rows["gate", "near"][2] == "0"
    assert rows["static", "<=0.5"][2:4] == ["3", "0.6300"] and rows["static", "best"][6] == "—"
    assert rows["static", "near"][2] == "0"
    static.points = [p for p in static.points if p.flops_real > 0.5]
    static.operating = operating_points(static, 0.5, 0.01)
    assert [row[3] for row in operating_rows([static], names) if row[1] == "<=0.5"] == ["no Pareto point qualifies"]


def test_a_method_under_two_protocols_is_labelled_by_it_and_set_beside_static_of_the_same_protocol():
    from tokprune.reporting.collect import relabel

    paper_static = made_up("static", [(0.63, 0.40)])
    shared_static = made_up("static", [(0.82, 0.43)])
    shared_top, paper_top = made_up("top", [(0.83, 0.45)]), made_up("top", [(0.84, 0.46)])
    for r, protocol in (
        (paper_static, "paper"),
        (shared_static, "shared"),
        (shared_top, "shared"),
        (paper_top, "paper"),
    ):
        r.protocol, r.study = protocol, f"{r.method}-{protocol}-study"
        r.operating = operating_points(r, 0.5, 0.01)
    results = relabel([paper_static, shared_top, paper_top, shared_static])
    assert [r.label for r in results] == [
        "static (protocol=shared)",
        "static (protocol=paper)",
        "top (protocol=shared)",
        "top (protocol=paper)",
    ]
    names = {"best": "best", "within_flops": "<=0.5", "near_baseline": "near"}
    rows = {(row[0], row[1]): row for row in operating_rows(results, names)}
    assert rows["top (protocol=shared)", "best"][6] == "0.8200"  # the shared static, not the paper one
    assert rows["top (protocol=paper)", "best"][6] == "0.6300"
    hard_top, twin = made_up("top", [(0.85, 0.45)]), made_up("top", [(0.85, 0.45)])
    for r, name in ((hard_top, "top-hard-study"), (twin, "top-hard-twin")):
        r.protocol, r.study, r.overrides = "shared", name, ["protocol.hard_phase=0.2"]
    labels = [r.label for r in relabel([shared_top, hard_top])]
    assert labels == ["top (protocol=shared)", "top (protocol=shared, protocol.hard_phase=0.2)"]
    assert [r.label for r in relabel([hard_top, twin])] == ["top-hard-study", "top-hard-twin"]  # same settings


def test_a_baseline_retrained_in_another_sitting_is_one_row_naming_both_runs():
    gate, top, other = made_up("gate", [(0.8, 0.5)]), made_up("top", [(0.8, 0.5)]), made_up("static", [(0.8, 0.5)])
    for r, run, metric in ((gate, "a", 0.85), (top, "b", 0.85), (other, "c", 0.84)):
        r.baseline = {"run_id": run * 32, "metric": metric, "flops_real": 1.0, "flops_padded": 0.4}
    assert [runs for _, runs in distinct_baselines([gate, top, other])] == [["a" * 32, "b" * 32], ["c" * 32]]
    rows = [row for row in table_rows([gate, top, other]) if row[0] == "none (baseline)"]
    assert [row[2:4] for row in rows] == [["runs aaaaaaaa, bbbbbbbb", "0.8500"], ["run cccccccc", "0.8400"]]


# -- bad input, without training -----------------------------------------------------------


def one_line_error(capsys, args) -> str:
    assert main(["report", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokprune: error: "), lines
    return lines[0]


def test_a_task_without_studies_names_the_sweep_to_run(tmp_path, capsys):
    line = one_line_error(capsys, ["task=rte", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    assert f"no sweep study of task rte for model=minilm budget=cpu seed=42 in {tmp_path / 'optuna.journal'}" in line
    assert "run `make sweep METHOD=<method> TASK=rte MODEL=minilm BUDGET=cpu SEED=42` first" in line
    assert not list(tmp_path.iterdir()), "looking must not create a store, a journal or a report"


def test_studies_of_another_model_are_named_in_the_error(tmp_path, capsys):
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(study_name="x", storage=storage, directions=["maximize", "minimize"])
    for key, value in {"method": "transkimmer", "task": "sst2", "model": "tiny", "budget": "smoke", "seed": 42}.items():
        study.set_user_attr(key, value)
    line = one_line_error(capsys, ["task=sst2", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    assert "no sweep study of task sst2 for model=minilm" in line
    assert "(it has studies of sst2 for model=tiny budget=smoke seed=42)" in line


def test_negative_speedup_examples_is_one_line_exit_2(tmp_path, capsys):
    line = one_line_error(capsys, ["report.speedup_examples=-1", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert "bad value for report.speedup_examples: -1 (expected an integer >= 0)" in line


def write_study(folder: Path, method: str, trials: list[tuple[float, float, float]]) -> None:
    """A study of ``method`` on sst2 (model=tiny, budget=smoke) in ``folder/optuna.journal``, written
    directly: (lambda_sparse, accuracy, FLOPs ratio) per complete trial, then one failed trial."""
    storage = JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    study = optuna.create_study(study_name=f"{method}-sst2", storage=storage, directions=["maximize", "minimize"])
    for key, value in {
        "method": method,
        "task": "sst2",
        "model": "tiny",
        "budget": "smoke",
        "seed": 42,
        "mlflow_parent_run_id": "not-in-this-store",
    }.items():
        study.set_user_attr(key, value)
    lam = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    for value, acc, flops in trials:
        study.add_trial(
            optuna.trial.create_trial(
                params={"method.lambda_sparse": value},
                distributions={"method.lambda_sparse": lam},
                values=[acc, flops],
                user_attrs={
                    "best/flops_ratio_padded": flops * 0.4,
                    "best/kept_fraction/layer_0": 1.0,
                    "best/kept_fraction/layer_1": flops,
                },
            )
        )
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))


def report_of(folder: Path, *extra: str) -> int:
    """``report`` over ``folder``'s store and journal, written to ``folder/out/sst2``."""
    return main(
        [
            "report",
            "task=sst2",
            "model=tiny",
            "budget=smoke",
            f"report.dir={folder}/out",
            f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db",
            *extra,
        ]
    )


GATE_TRIALS = [(0.002, 0.91, 0.95), (0.03, 0.90, 0.61), (0.2, 0.88, 0.72), (0.6, 0.84, 0.38)]


def test_a_study_written_directly_renders_without_mlflow_runs(tmp_path, capsys):
    """No training: a study with realistic values but no MLflow records (another store, say)."""
    write_study(tmp_path, "gate", GATE_TRIALS)
    assert report_of(tmp_path) == 0
    rows = table((tmp_path / "out" / "sst2" / "pareto.md").read_text())
    assert [r[:2] + r[3:6] for r in rows] == [  # trial 2 (0.88 at 0.72) is dominated by trial 1
        ["gate", "3", "0.8400", "0.3800", "0.1520"],
        ["gate", "1", "0.9000", "0.6100", "0.2440"],
        ["gate", "0 (best)", "0.9100", "0.9500", "0.3800"],
    ]
    assert rows[2][6] == rows[0][6] == "skipped: no MLflow run"  # the best point, and the best at <= 0.5
    assert rows[1][6] == ""  # not an operating point: not timed
    operating = table((tmp_path / "out" / "sst2" / "pareto.md").read_text(), "Operating points")
    assert [r[2] for r in operating] == ["0", "3", "—"]  # no baseline: nothing is "within 1 point" of it
    assert {p.name for p in (tmp_path / "out" / "sst2").iterdir()} == {
        "pareto_all.png",
        "pareto_gate.png",
        "kept_gate.png",
        "pareto.md",
        "report.html",
        "report.json",
    }
    assert "<title>gate trial 2 (dominated)" in (tmp_path / "out" / "sst2" / "report.html").read_text()
    assert "logged them to the report/ artifacts of 0 parent run(s)" in capsys.readouterr().out


def test_report_carry_keeps_the_studies_this_storage_lacks_as_recorded(tmp_path):
    """Sweeps run in sittings that share no storage end up in one report: a study the storage
    holds is read afresh; one it lacks comes from the earlier report.json, speedups included."""
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for folder in (first, second, third):
        folder.mkdir()
    write_study(first, "gate", GATE_TRIALS)
    write_study(first, "static", [(0.5, 0.89, 0.80), (0.9, 0.70, 0.40)])
    assert report_of(first) == 0
    earlier = first / "out" / "sst2" / "report.json"
    data = json.loads(earlier.read_text())
    [static] = [m for m in data["methods"] if m["method"] == "static"]
    static["speedup"]["0"] = {
        "checkpoint": "ckpt/best.ckpt",
        "batch_1": {"wall_speedup": 1.25},
        "batch_32": {"wall_speedup": 2.5},
    }  # as if measured where it ran
    earlier.write_text(json.dumps(data))
    write_study(second, "gate", GATE_TRIALS[:2])  # the gate sweep again, 2 trials so far: read afresh

    assert report_of(second, f"report.carry={earlier}") == 0
    md = (second / "out" / "sst2" / "pareto.md").read_text()
    operating = {(r[0], r[1]): r for r in table(md, "Operating points")}
    assert operating["gate", "highest dev accuracy"][2:4] == ["0", "0.9100"]
    assert operating["gate", "best at FLOPs ratio <= 0.5"][3] == "no Pareto point qualifies"  # trial 3 is not here
    assert operating["static", "highest dev accuracy"][2:4] == ["0", "0.8900"]
    # timed in torch where it ran; not in ONNX Runtime (a report from before it was): those cells empty
    assert operating["static", "highest dev accuracy"][8:] == ["x1.25", "x2.50", "", ""]
    assert operating["static", "best at FLOPs ratio <= 0.5"][8] == "skipped: no MLflow run"  # as recorded
    assert operating["gate", "highest dev accuracy"][6] == "0.8900"  # beside the carried static front
    joined = json.loads((second / "out" / "sst2" / "report.json").read_text())
    origin = {m["study"]: m["carried_from"] for m in joined["methods"]}
    assert origin == {"gate-sst2": "", "static-sst2": f"sst2/report.json of {data['generated']}"}
    assert f"Carried from sst2/report.json of {data['generated']} (report.carry)" in md and "static." in md
    assert "Studies: gate-sst2 in " in (second / "out" / "sst2" / "report.html").read_text()
    assert {p.name for p in (second / "out" / "sst2").glob("*.png")} == {
        "pareto_all.png",
        "pareto_gate.png",
        "pareto_static.png",
        "kept_gate.png",
        "kept_static.png",
    }

    # carried again, into a storage with no study at all: each study keeps where it first came from
    assert report_of(third, f"report.carry={second / 'out' / 'sst2' / 'report.json'}") == 0
    again = json.loads((third / "out" / "sst2" / "report.json").read_text())
    assert {m["study"]: m["carried_from"] for m in again["methods"]} == {
        "gate-sst2": f"sst2/report.json of {joined['generated']}",
        "static-sst2": origin["static-sst2"],
    }
    assert table((third / "out" / "sst2" / "pareto.md").read_text(), "Operating points") == list(operating.values())


def test_a_carried_report_of_another_run_set_is_one_line_exit_2(tmp_path, capsys):
    other = tmp_path / "report.json"
    other.write_text(json.dumps({"task": "mrpc", "model": "tiny", "budget": "smoke", "seed": 42, "methods": []}))
    args = ["task=sst2", "model=tiny", "budget=smoke", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    line = one_line_error(capsys, [*args, f"report.carry={other}"])
    assert f"report.carry={other}: it reports task=mrpc model=tiny budget=smoke seed=42, not task=sst2" in line
    line = one_line_error(capsys, [*args, f"report.carry={tmp_path}/missing.json"])
    assert f"report.carry={tmp_path}/missing.json: cannot read it as a report.json (FileNotFoundError)" in line


def test_a_failing_report_only_warns_at_the_end_of_a_sweep(monkeypatch):
    import tokprune.reporting.report as report_module

    def broken(cfg):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(report_module, "build_report", broken)
    said = []
    after_sweep(["task=sst2"], said.append)  # must not raise
    assert said == ["warning: report not written (RuntimeError: disk full); run `python -m tokprune report` later"]


# -- a report of real recorded studies -----------------------------------------------------


@pytest.mark.slow
def test_each_sweep_ends_by_writing_the_report_and_logging_it(recorded):
    data = json.loads((recorded / "reports" / "sst2" / "report.json").read_text())
    assert [m["method"] for m in data["methods"]] == ["none", "transkimmer"]  # the second sweep saw both
    assert {p.name for p in (recorded / "reports" / "sst2").iterdir()} == FILES
    for name in ("report.json", "report.html", "pareto.md"):  # committed reports name no folder of this machine
        assert str(recorded) not in (recorded / "reports" / "sst2" / name).read_text(), name
    client = MlflowClient(f"sqlite:///{recorded}/mlflow.db")
    for study in studies(recorded).values():
        logged = {Path(a.path).name for a in client.list_artifacts(study.user_attrs["mlflow_parent_run_id"], "report")}
        assert "report.html" in logged and "pareto.md" in logged


@pytest.mark.slow
def test_report_renders_every_file_and_its_table_is_the_studys(recorded, tmp_path):
    out = tmp_path / "reports"
    assert report(recorded, out) == 0
    folder = out / "sst2"
    assert {p.name for p in folder.iterdir()} == FILES
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            assert image.size[0] > 500 and len(image.convert("RGB").getcolors(1 << 24)) > 50, png
    rows = table((folder / "pareto.md").read_text())
    client = MlflowClient(f"sqlite:///{recorded}/mlflow.db")
    baseline_ids = set()
    for method, study in studies(recorded).items():
        front = {t.number: t for t in study.best_trials}
        mine = {int(r[1].split()[0]): r for r in rows if r[0] == method}
        assert set(mine) == set(front), f"{method}: every Pareto point, and only those"
        for number, t in front.items():
            row = mine[number]
            assert row[3] == f"{t.values[0]:.4f}" and row[4] == f"{t.values[1]:.4f}"
            assert row[5] == f"{t.user_attrs['best/flops_ratio_padded']:.4f}"
            assert all(f"{k}={v:.4g}" in row[2] for k, v in t.params.items())
        best = max(front.values(), key=lambda t: (t.values[0], -t.values[1]))
        assert [r[1] for r in mine.values() if "(best)" in r[1]] == [f"{best.number} (best)"]
        speedup = re.fullmatch(r"x(\d+\.\d\d)(?: \(slower\))? / x(\d+\.\d\d)(?: \(slower\))?", mine[best.number][6])
        assert speedup and float(speedup[1]) > 0 and float(speedup[2]) > 0, mine[best.number][6]
        baseline_ids.add(client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.tags["baseline_run_id"])
    assert len(baseline_ids) == 1, "both sweeps share one baseline"
    base = client.get_run(baseline_ids.pop()).data.metrics
    assert [r for r in rows if r[0] == "none (baseline)"][0][3:6] == [
        f"{base['best/accuracy']:.4f}",
        f"{base['best/flops_ratio_real']:.4f}",
        f"{base['best/flops_ratio_padded']:.4f}",
    ]
    operating = table((folder / "pareto.md").read_text(), "Operating points")
    data = json.loads((folder / "report.json").read_text())
    for method, study in studies(recorded).items():
        best = max(study.best_trials, key=lambda t: (t.values[0], -t.values[1]))
        [row] = [r for r in operating if r[0] == method and r[1] == "highest dev accuracy"]
        assert row[2] == str(best.number) and row[3] == f"{best.values[0]:.4f}"
        [saved] = [m for m in data["methods"] if m["method"] == method]
        assert saved["operating"]["best"] == best.number
        timed = saved["speedup"][str(best.number)]
        assert [timed[f"batch_{b}"]["examples"] for b in (1, 32)] == [EXAMPLES, EXAMPLES]
        assert row[8:10] == [speedup_cell(timed[f"batch_{b}"]["wall_speedup"]) for b in (1, 32)]
        # and in ONNX Runtime: the exported pruned graph against the exported unpruned one
        assert [timed[f"onnx_batch_{b}"]["engine"] for b in (1, 32)] == ["onnxruntime"] * 2
        assert row[10:] == [speedup_cell(timed[f"onnx_batch_{b}"]["wall_speedup"]) for b in (1, 32)]
    page = (folder / "report.html").read_text()
    assert "<h2>Operating points</h2>" in page and "<h2>Pareto points</h2>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(\s*["']?https?:|<img|<script|<link""", page)
    for study in studies(recorded).values():  # every complete trial can be hovered for its parameters
        for t in study.get_trials(states=(TrialState.COMPLETE,)):
            assert f"<title>{study.user_attrs['method']} trial {t.number} (" in page
    for text in ("fvcore (1 multiply-add = 1 FLOP)", "at their real length", "padded to task.max_length=64"):
        assert text in page and text in (folder / "pareto.md").read_text()


@pytest.mark.slow
def test_rerunning_replaces_the_mlflow_artifacts_and_stale_files(recorded, tmp_path):
    out = tmp_path / "reports"
    client = MlflowClient(f"sqlite:///{recorded}/mlflow.db")
    parent = studies(recorded)["transkimmer"].user_attrs["mlflow_parent_run_id"]
    stale = tmp_path / "pareto_gone.png"
    stale.write_bytes(b"old")
    client.log_artifact(parent, str(stale), "report")  # a method no longer in the report
    (out / "sst2").mkdir(parents=True)
    shutil.copy(stale, out / "sst2" / stale.name)
    for _ in range(2):
        assert report(recorded, out, "report.speedup_examples=0") == 0
    logged = sorted(Path(a.path).name for a in client.list_artifacts(parent, "report"))
    assert logged == sorted(FILES) == sorted(p.name for p in (out / "sst2").iterdir())
    remote = Path(client.download_artifacts(parent, "report/pareto.md", str(tmp_path / "dl")))
    assert remote.read_text() == (out / "sst2" / "pareto.md").read_text()
    assert "skipped: report.speedup_examples=0" in remote.read_text()


@pytest.mark.slow
def test_a_missing_checkpoint_skips_the_speedup_cleanly(recorded, tmp_path, capsys):
    study = studies(recorded)["transkimmer"]
    best = max(study.best_trials, key=lambda t: (t.values[0], -t.values[1]))
    ckpt = recorded / "ckpt" / best.user_attrs["mlflow_run_id"] / "best.ckpt"
    moved = tmp_path / "best.ckpt"
    shutil.move(ckpt, moved)
    try:
        assert report(recorded, tmp_path / "reports") == 0
    finally:
        shutil.move(moved, ckpt)
    row = [
        r
        for r in table((tmp_path / "reports" / "sst2" / "pareto.md").read_text())
        if "(best)" in r[1] and r[0] == "transkimmer"
    ][0]
    assert row[6].startswith(f"skipped: checkpoint missing ({ckpt.parent.name}/best.ckpt; ")  # no machine path
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Chromium is not installed (apt-get install chromium)")
def test_the_page_renders_its_charts_in_headless_chromium(recorded, tmp_path):
    out = tmp_path / "reports"
    assert report(recorded, out, "report.speedup_examples=0") == 0
    page = out / "sst2" / "report.html"
    no_charts = tmp_path / "no_charts.html"  # the control: the same page, its figures removed
    no_charts.write_text(re.sub(r"<svg.*?</svg>", "", page.read_text(), flags=re.S))

    def screenshot(html: Path) -> Image.Image:
        shot = tmp_path / f"{html.stem}.png"
        subprocess.run(
            [
                str(CHROMIUM),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--screenshot={shot}",
                "--window-size=1200,2000",
                html.as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
        return Image.open(shot).convert("RGB")

    def coloured(image: Image.Image) -> int:
        """Saturated pixels: markers and lines of the charts (text and tables are grey)."""
        return sum(n for n, (r, g, b) in image.getcolors(1 << 24) if max(r, g, b) - min(r, g, b) > 80)

    image = screenshot(page)
    assert image.size == (1200, 2000)
    assert len(image.getcolors(1 << 24)) > 200 and coloured(image) > 300
    assert coloured(screenshot(no_charts)) < 20


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Chromium is not installed (apt-get install chromium)")
def test_the_mlflow_ui_runs_table_answers_and_the_report_labels_tell_trials_apart(recorded, tmp_path):
    """In a real browser: the URL ``make ui`` prints opens the runs table (not MLflow's traces page),
    which lists the sweep's runs by name and their training data; the report's point labels differ
    between the trials of one study."""
    import time
    import urllib.request

    from tokprune.training.tracking import runs_view

    uri = f"sqlite:///{recorded}/mlflow.db"
    port = _free_port()
    url = runs_view(uri, port=port).splitlines()[0].split(": ", 1)[1]
    assert "/#/experiments/" in url and url.endswith("/runs")
    server = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "mlflow"), "ui", "--backend-store-uri", uri, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow ui did not start"
                time.sleep(1)
        dom = subprocess.run(
            [
                str(CHROMIUM),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = _text_of(dom)
    assert "Run Name" in text and "Dataset" in text  # the runs table, not the traces overview
    # each study is one row (its trials are nested under it), beside the baseline
    assert "sweep-transkimmer-sst2-tiny-smoke-seed42" in text and "sweep-none-sst2-tiny-smoke-seed42" in text
    assert "none-sst2-tiny-smoke" in text
    assert "sst2/train" in text and "sst2/dev" in text  # the Dataset column says what the runs trained on
    out = tmp_path / "reports"
    assert report(recorded, out, "report.speedup_examples=0") == 0
    svg = _text_of((out / "sst2" / "report.html").read_text())
    labels = re.findall(r"t\d+ skim_lambda=[0-9.e-]+", svg)  # the first of the parameters that vary
    assert len(set(labels)) >= 2


def test_labels_name_what_varies_within_a_study_and_slowdowns_say_so():
    from tokprune.reporting.plots import short_label, varying

    points = [
        Point(
            trial=n,
            params={"method.skim_lambda": 5.0, "method.skim_target": t},
            metric=0.8,
            flops_real=t,
            flops_padded=None,
            kept=[],
            run_id=None,
            pareto=True,
        )
        for n, t in enumerate((0.3, 0.55))
    ]
    keys = varying(points)
    assert keys == ["method.skim_target"]  # skim_lambda is the same in every trial
    assert [short_label(p, keys) for p in points] == ["t0 skim_target=0.3", "t1 skim_target=0.55"]
    assert speedup_cell(0.83) == "x0.83 (slower)" and speedup_cell(1.45) == "x1.45"


def test_every_trial_with_a_flops_target_is_set_beside_static_at_the_same_target():
    from tokprune.config import compose
    from tokprune.reporting.render import target_rows

    def trained(method, cells):  # (target, metric, FLOPs, repeats)
        r = made_up(method, [(m, f) for _, m, f, _ in cells])
        for p, (target, _, flops, repeats) in zip(r.points, cells):
            p.params = {"protocol.target_flops": target}
            p.repeats = [{"seed": 43 + i, "metric": m, "flops_real": flops} for i, m in enumerate(repeats)]
        r.protocol = "shared"
        return r

    static = trained("static", [(0.5, 0.84, 0.49, [0.85, 0.83]), (0.4, 0.80, 0.40, [])])
    top = trained("top", [(0.5, 0.80, 0.50, [0.81, 0.79]), (0.4, 0.81, 0.45, []), (0.3, 0.70, 0.31, [])])
    cfg = compose(["task=sst2"])
    rows = {(row[0], row[1]): row for row in target_rows([top, static], cfg)}
    assert list(rows) == [
        ("0.3", "top"),
        ("0.4", "top"),
        ("0.4", "static"),
        ("0.5", "top"),
        ("0.5", "static"),
    ]
    top.points[0].repeats[1]["flops_real"] = 0.52  # seed 44 above 0.5 + epsilon 0.01
    rows = {(row[0], row[1]): row for row in target_rows([top, static], cfg)}
    assert rows["0.5", "top"][3:10] == [
        "0.8000 +- 0.0100 (3 seeds)",
        "-0.0500",
        "0.5067 +- 0.0115",
        "—",
        "2 of 3 seeds",
        "0.8400 +- 0.0100 (3 seeds)",
        "-0.0400 (> 2 SE 0.0163)",
    ]
    assert rows["0.4", "top"][7:10] == ["no", "0.8000", "+0.0100 (one seed)"]  # 0.45 > 0.4 + epsilon 0.01
    assert rows["0.3", "top"][8:10] == ["—", "—"]  # no static trial at 0.3
    assert rows["0.5", "static"][8] == "—"
    assert target_rows([made_up("gate", [(0.8, 0.5)])], cfg) == []  # no target parameter: no table
    twice = trained("top", [(0.5, 0.86, 0.50, []), (0.5, 0.80, 0.50, [0.81])])
    assert twice.at_target(0.5).trial == 1  # the repeated one, as repeat picks: not the luckier
