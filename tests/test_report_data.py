"""report.json: the report's numbers as data, equal to report.md's cells and to the runs' own records."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evolora.cli import app
from evolora.eval.report import compose_report
from evolora.io import save_npz


def _write_runs(root: Path) -> dict[tuple[str, int], dict[int, float]]:
    """finetune and strong, 3 seeds, stages 2-3 evaluated; each seed's AUC differs. Returns what was
    recorded: (method, seed) -> {evaluated stage: auc}."""
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 80).astype(float)
    recorded = {}
    for method, signal in (("finetune", 0.3), ("strong", 1.0)):
        for seed in range(3):
            folder = root / method / f"seed{seed}"
            stages = []
            for t in (1, 2):
                (folder / f"stage-{t}").mkdir(parents=True)
                scores = signal * truth + rng.random(80)
                save_npz(
                    folder / f"stage-{t}" / "predictions.npz",
                    {"scores": scores, "rows": np.arange(80), "truth": truth},
                )
                auc = round(0.6 + 0.1 * signal + 0.01 * seed + 0.001 * t, 6)
                recorded[(method, seed)] = {**recorded.get((method, seed), {}), t + 1: auc}
                stages.append(
                    {
                        "train_stage": t,
                        "eval_stage": t + 1,
                        "n_eval": 80,
                        "metrics": {"auc": auc, "logloss": 0.7 - auc / 10},
                    }
                )
            run = {
                "method": method,
                "dataset": "d",
                "task": "ctr",
                "seed": seed,
                "complete": True,
                "stages": stages,
            }
            (folder / "results.json").write_text(json.dumps(run))
    return recorded


def _row(text: str, section: str, method: str) -> list[str]:
    part = text.split(section, 1)[1]
    line = next(x for x in part.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_data_matches_the_markdown_and_the_runs(tmp_path: Path) -> None:
    recorded = _write_runs(tmp_path)
    report = compose_report([tmp_path])
    data = report.data
    assert data["methods"] == ["finetune", "strong"] and data["baseline"] == "finetune"
    auc = data["metrics"]["auc"]
    assert auc["higher_is_better"] and not data["metrics"]["logloss"]["higher_is_better"]
    for method in ("finetune", "strong"):
        entry = auc["methods"][method]
        assert entry["seeds"] == [0, 1, 2]
        cells = _row(report.text, "### AUC per evaluated stage", method)
        for stage, cell in zip(entry["stages"], cells[2:4], strict=True):
            assert stage["values"] == [recorded[(method, s)][stage["stage"]] for s in range(3)]
            assert cell == f"{np.mean(stage['values']):.4f} ± {np.std(stage['values']):.4f}"
            assert math.isclose(stage["mean"], np.mean(stage["values"]))
        per_seed = [np.mean(list(recorded[(method, s)].values())) for s in range(3)]
        assert np.allclose(entry["mean"]["values"], per_seed)
        assert cells[4] == f"{entry['mean']['mean']:.4f} ± {entry['mean']['std']:.4f}"
        assert cells[5] == f"{entry['vs_baseline_percent']:+.2f}%"
    # lower-is-better: a lower LogLoss is a positive gain, as the table's column
    assert data["metrics"]["logloss"]["methods"]["strong"]["vs_baseline_percent"] > 0
    diff = data["differences"]
    assert (diff["metric"], diff["baseline"], diff["draws"]) == ("auc", "finetune", 1000)
    strong = diff["methods"]["strong"]
    cells = _row(report.text, "### Paired bootstrap", "strong")
    assert cells[1] == f"{strong['difference']:+.4f}"
    assert cells[2] == f"[{strong['low']:+.4f}, {strong['high']:+.4f}]"
    assert cells[3] == f"{strong['p_better']:.2f}" and strong["decided"] is (cells[4] == "yes")
    assert strong["low"] > 0 and strong["decided"]


def test_report_command_writes_report_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evolora import progress
    from evolora.eval import bootstrap

    _write_runs(tmp_path / "runs")
    shown = []
    difference = bootstrap._difference

    def watched(*args, **kwargs):  # a bootstrap over many runs takes minutes: its bar is up
        shown.append(progress._active is not None)
        return difference(*args, **kwargs)

    monkeypatch.setattr(bootstrap, "_difference", watched)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert shown == [True]
    assert "report.json" in result.output

    def no_nan(name: str) -> None:
        raise AssertionError(f"report.json holds {name}: not JSON")

    data = json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=no_nan)
    assert re.search(r"\| strong \| 3 \|", (tmp_path / "out" / "report.md").read_text())
    assert data["differences"]["methods"]["strong"]["decided"] is True


def test_a_report_folder_keeps_no_earlier_plot_and_a_failed_one_no_folder(tmp_path: Path) -> None:
    """A plot an earlier report wrote and this one does not (a matrix of other runs) stood beside a
    report.md without it; a report that could not be composed left the parents --out made."""
    _write_runs(tmp_path / "runs")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    listed = json.loads((out / "report.json").read_text())
    assert listed["plots"] == ["auc.png"]
    # as an earlier report of matrix runs would have left it; a file of the user's stays
    # (another metric's plot, from a report --metric logloss into the folder, stays)
    earlier = ["auc.png", "auc-matrix.png", "logloss.png"]
    (out / "report.json").write_text(json.dumps({**listed, "plots": earlier}))
    for name in ("auc-matrix.png", "logloss.png", "mine.png"):
        (out / name).write_bytes(b"png")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    kept = ["auc.png", "logloss.png", "mine.png", "report.json", "report.md"]
    assert sorted(p.name for p in out.iterdir()) == kept
    (tmp_path / "empty").mkdir()
    nested = tmp_path / "x" / "y" / "z"
    result = CliRunner().invoke(app, ["report", str(tmp_path / "empty"), "--out", str(nested)])
    assert result.exit_code == 2 and not (tmp_path / "x").exists(), result.output


def test_the_python_api_gives_the_same_report(tmp_path: Path) -> None:
    import evolora

    _write_runs(tmp_path)
    same = compose_report([tmp_path])
    for given in (str(tmp_path), tmp_path, [tmp_path / "finetune", tmp_path / "strong"]):
        report = evolora.report(given)
        assert report.data == same.data and report.text == same.text
    assert "differences" not in evolora.report(tmp_path / "strong").data  # no baseline among the runs


def _edit_runs(root: Path, edit) -> None:
    """Rewrite every results.json below `root` through `edit(run) -> run`."""
    for path in root.rglob("results.json"):
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_a_run_started_without_a_stage_recorded_is_named(tmp_path: Path) -> None:
    """A method (or seed) whose runs have a run.json but no results.json yet vanished from the report
    without a word; the report names it (a folder an --overwrite moved aside stays out)."""
    _write_runs(tmp_path)
    started = ("peso", "seed0"), ("strong", "seed3"), (".x.replaced", "a")
    for folder in (tmp_path.joinpath(*parts) for parts in started):
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"strategy": "peso", "options": {}}))
    text = compose_report([tmp_path]).text
    assert "no stage recorded yet (not in the tables until one is): peso seed0, strong seed3." in text
    assert "| strong | 3 |" in text


def test_a_seed_still_running_is_left_out_of_its_methods_mean_and_named(tmp_path: Path) -> None:
    """A seed stopped after D2 beside seeds through D3: averaging it over D2 alone and the others over both
    made a mean of unlike means (the helper's kill gave -3% vs finetune for a method equal to it). The mean,
    the gain and the bootstrap take the finished seeds; the per-stage cells keep every seed's value."""
    recorded = _write_runs(tmp_path)
    unfinished = tmp_path / "strong" / "seed2" / "results.json"
    run = json.loads(unfinished.read_text())
    unfinished.write_text(json.dumps({**run, "complete": False, "stages": run["stages"][:1]}))
    report = compose_report([tmp_path])
    assert report.data["format"] == 3
    strong = report.data["metrics"]["auc"]["methods"]["strong"]
    assert strong["averaged_stages"] == [2, 3]
    finished = [np.mean(list(recorded[("strong", s)].values())) for s in range(2)]
    assert np.allclose(strong["mean"]["values"][:2], finished) and strong["mean"]["values"][2] is None
    cells = _row(report.text, "### AUC per evaluated stage", "strong")
    assert cells[3].endswith(" (n=2)") and "(n=" not in cells[2]  # D3 holds two of the three seeds
    assert cells[4].endswith(" (n=2) (vs on seeds 0, 1, both finished)") and "only" not in cells[4]
    assert strong["vs_baseline_over"] == {"stages": [2, 3], "seeds": [0, 1]}
    assert "(n=" not in _row(report.text, "### AUC per evaluated stage", "finetune")[3]
    assert "left out of its means and differences until they catch up" in report.text
    assert "strong seed 2 (D2 of D2..D3)" in report.text
    # the bootstrap takes the same two seeds as the table's means: as if the third were not there
    shutil.rmtree(tmp_path / "strong" / "seed2")
    without = compose_report([tmp_path]).data["differences"]["methods"]["strong"]
    assert report.data["differences"]["methods"]["strong"] == without
    # A seed that has recorded only a shared first stage does not empty its method's mean (an experiment in
    # progress), and the user-kind means take the finished seeds.
    from evolora.eval.summary import MethodRuns

    def seed(n: int, stages: tuple[int, ...]) -> dict:
        records = [{"eval_stage": t, "metrics": {"auc": t / 10}} for t in stages]
        kinds = [{"by_user_kind": {"new": {"auc": r["eval_stage"]}}} for r in records]
        return {"seed": n, "stages": [{**r, **k} for r, k in zip(records, kinds, strict=True)]}

    group = MethodRuns("m", "d", "ctr", [seed(0, (2, 3, 4)), seed(1, (2, 3, 4)), seed(2, (2,))])
    assert group.seed_means("auc", skip=2) == pytest.approx({0: 0.35, 1: 0.35})
    assert group.kind_values("auc", skip=2) == {"new": [3.5, 3.5]}
    assert group.unfinished_seeds() == ["seed 2 (D2 of D2..D4)"]


def test_the_bootstrap_names_its_metric_and_skips_an_undefined_one(tmp_path: Path) -> None:
    _write_runs(tmp_path)
    _edit_runs(tmp_path, lambda r: {**r, "stages": [
        {**s, "metrics": {**s["metrics"], "log_items": 4.0}} for s in r["stages"]]})  # fmt: skip
    # a reference figure asked for first: the bootstrap is of the first that scores, and says so
    report = compose_report([tmp_path], ["log_items", "auc", "auc"])
    assert report.lead == "auc" and report.data["differences"]["metric"] == "auc"
    assert report.text.count("### AUC per evaluated stage") == 1  # asked twice, shown once
    # AUC undefined on every stage (rows of one label): LogLoss leads the bootstrap and the plot
    _edit_runs(tmp_path, lambda r: {**r, "stages": [
        {**s, "metrics": {**s["metrics"], "auc": None}} for s in r["stages"]]})  # fmt: skip
    report = compose_report([tmp_path])
    assert report.lead == "logloss" and report.data["differences"]["metric"] == "logloss"
    assert "### Paired bootstrap: LOGLOSS difference to finetune" in report.text
    # the undefined stages are in report.json as null, not left out (a script could not tell them from
    # stages never evaluated)
    auc = report.data["metrics"]["auc"]["methods"]["finetune"]
    assert [(s["stage"], s["values"], s["mean"]) for s in auc["stages"]] == [
        (2, [None] * 3, None),
        (3, [None] * 3, None),
    ]


def test_one_evaluated_stage_shared_by_every_method_is_said_plainly(tmp_path: Path) -> None:
    for method in ("finetune", "frozen"):
        folder = tmp_path / method / "seed0"
        (folder / "stage-1").mkdir(parents=True)
        arrays = {"scores": np.linspace(0, 1, 8), "rows": np.arange(8), "truth": np.arange(8) % 2}
        save_npz(folder / "stage-1" / "predictions.npz", arrays)
        stage = {"train_stage": 1, "eval_stage": 2, "n_eval": 8, "metrics": {"auc": 0.5, "logloss": 0.7}}
        run = {"method": method, "dataset": "d", "task": "ctr", "seed": 0, "complete": True}
        run["stages"] = [stage]
        (folder / "results.json").write_text(json.dumps(run))
    report = compose_report([tmp_path])
    assert "the only evaluated stage: nothing tells them apart" in report.text
    assert "(no paired predictions)" not in report.text and "differences" not in report.data


def test_a_baseline_with_the_shared_stage_alone_is_said_so_in_the_bootstrap(tmp_path: Path) -> None:
    """finetune stopped after its first stage, which every method shares (left out): its bootstrap row
    said "no paired predictions" though both had them."""
    _write_runs(tmp_path)
    first = {"auc": 0.7, "logloss": 0.6}

    def edit(run: dict) -> dict:
        stages = [{**run["stages"][0], "metrics": first}, *run["stages"][1:]]
        return {**run, "stages": stages[:1] if run["method"] == "finetune" else stages}

    _edit_runs(tmp_path, edit)
    for seed in range(3):  # the same scores on the shared stage
        shutil.copy(
            tmp_path / "finetune" / f"seed{seed}" / "stage-1" / "predictions.npz",
            tmp_path / "strong" / f"seed{seed}" / "stage-1" / "predictions.npz",
        )
    report = compose_report([tmp_path])
    assert "| strong | – | (no stage but D2, which every method shares) | – | – |" in report.text


def test_an_out_folder_that_cannot_be_written_stops_the_report_before_its_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolora.eval import report as report_mod

    _write_runs(tmp_path / "runs")
    composed = []
    real = report_mod.compose_report
    monkeypatch.setattr(report_mod, "compose_report", lambda *a, **k: composed.append(1) or real(*a, **k))
    (tmp_path / "file").write_text("x")
    below_a_file = str(tmp_path / "file" / "r")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", below_a_file])
    assert result.exit_code == 2 and "cannot be created" in result.output and composed == []
    # a report that cannot be composed leaves no empty --out folder behind
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--metric", "nope", "--out",
                                      str(tmp_path / "new")])  # fmt: skip
    assert result.exit_code == 2 and composed == [1] and not (tmp_path / "new").exists()


def test_a_method_whose_seeds_all_stopped_early_is_compared_on_its_own_stages() -> None:
    """Equal to the baseline wherever both have a value, but through D3 of D4: its gain was taken against the
    baseline's D2..D4 mean (-5.26% for no difference); the time of a finished run is a finished seed's."""
    from evolora.eval.report import metric_table
    from evolora.eval.summary import MethodRuns

    values = {2: 0.6, 3: 0.6, 4: 0.7}

    def run(seed: int, stages: tuple[int, ...], seconds: float) -> dict:
        records = [{"eval_stage": t, "metrics": {"auc": values[t]}} for t in stages]
        return {"seed": seed, "stages": records, "summary": {"train_seconds": seconds}}

    base = MethodRuns("finetune", "d", "ctr", [run(0, (2, 3, 4), 30.0), run(1, (2, 3), 20.0)])
    early = MethodRuns("x", "d", "ctr", [run(0, (2, 3), 20.0), run(1, (2, 3), 20.0)])
    table = metric_table([base, early], "auc", None, "finetune")
    row = next(line for line in table.splitlines() if line.startswith("| x |"))
    assert "(D2, D3 only; vs on D2, D3; vs on seed 0, both finished)" in row and row.endswith("| +0.00% |")
    assert early.gain_over(base, "auc") == 0.0 and base.gain_over(base, "auc") == 0.0
    assert base.train_seconds() == 30.0  # seed 1, still running, has spent less


def test_a_gain_compares_the_stages_and_seeds_both_finished() -> None:
    """A method equal to the baseline seed by seed gains 0: when the baseline's seeds all stopped after D2
    (its D2 was set against the method's D2..D3 mean: -28% in an audit) and when the two finished other
    seeds (the method's seed 0 against the baseline's mean over seeds 0..2: +6%)."""
    from evolora.eval.report import metric_table
    from evolora.eval.summary import MethodRuns, relative_gain

    def run(seed: int, values: dict[int, float]) -> dict:
        return {"seed": seed, "stages": [{"eval_stage": t, "metrics": {"auc": v}} for t, v in values.items()]}

    early_base = MethodRuns("finetune", "d", "ctr", [run(0, {2: 0.6}), run(1, {2: 0.7})])
    later = MethodRuns("x", "d", "ctr", [run(0, {2: 0.6, 3: 0.9}), run(1, {2: 0.7, 3: 0.9})])
    assert later.gain_over(early_base, "auc") == 0.0
    row = next(r for r in metric_table([early_base, later], "auc").splitlines() if r.startswith("| x |"))
    assert "(vs on D2)" in row and row.endswith("| +0.00% |")

    base = MethodRuns("finetune", "d", "ctr", [run(s, {2: 0.6 + s / 10, 3: 0.5}) for s in range(3)])
    behind = MethodRuns("x", "d", "ctr", [run(0, {2: 0.6, 3: 0.5}), run(1, {2: 0.7})])
    assert behind.gain_over(base, "auc") == 0.0
    row = next(r for r in metric_table([base, behind], "auc").splitlines() if r.startswith("| x |"))
    assert "(n=1) (vs on seed 0, both finished)" in row and row.endswith("| +0.00% |")
    # no finished seed in common: each side's own seeds, said so
    other = MethodRuns("y", "d", "ctr", [run(5, {2: 0.6, 3: 0.5})])
    assert other.gain_over(base, "auc") == relative_gain([0.55], 0.6, "auc")
    row = next(r for r in metric_table([base, other], "auc").splitlines() if r.startswith("| y |"))
    assert "(vs unpaired: no finished seed in common)" in row
