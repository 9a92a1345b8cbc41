"""The stage-by-stage matrix (`eval.stages`) on the tiny model; its summaries against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evolora.data.prepare import prepare_data
from evolora.data.samples import evaluation_rows
from evolora.errors import DataError
from evolora.eval.forgetting import summaries
from evolora.experiment import run_dir_of, run_experiment
from tests.helpers import tiny_config

LEARN = {"train.lr": 0.03, "train.schedule": "constant", "train.samples_per_stage": 48}


def _results(cfg, method: str) -> dict:
    return json.loads((run_dir_of(cfg, method, 0) / "results.json").read_text())


@pytest.fixture(scope="module")
def matrix_run(sunny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = tiny_config(sunny_dir, tmp_path_factory.mktemp("matrix"), **LEARN, **{"eval.stages": "all"})
    run_experiment(cfg)
    return cfg


def test_matrix_shape_entries_and_reuse(matrix_run) -> None:
    cfg = matrix_run
    frozen, finetune = _results(cfg, "frozen"), _results(cfg, "finetune")
    for res in (frozen, finetune):
        assert [s["train_stage"] for s in res["stages"]] == [1, 2]
        for s in res["stages"]:
            assert list(s["matrix"]) == ["1", "2", "3"]  # `all`: every stage, the test-only last one too
            assert s["matrix"][str(s["eval_stage"])] == s["metrics"]  # the ordinary next-stage evaluation
            for j in (1, 2, 3):
                saved = np.load(run_dir_of(cfg, res["method"], 0) / f"stage-{s['train_stage']}" / (
                    "predictions.npz" if j == s["eval_stage"] else f"predictions-stage-{j}.npz"))  # fmt: skip
                assert len(saved["rows"]) == 40
    # Stage 1 is the shared job: finetune's first row is frozen's, read from the store, not predicted again.
    assert finetune["stages"][0]["matrix"] == frozen["stages"][0]["matrix"]
    assert finetune["stages"][0]["matrix_reused"] == 2
    # frozen never changes its model: its second row is its first, every entry reused.
    assert frozen["stages"][1]["matrix"] == frozen["stages"][0]["matrix"]
    assert frozen["stages"][1]["matrix_reused"] == 2
    # finetune trained on stage 2: its model changed, so its entries were predicted again.
    assert finetune["stages"][1]["matrix_reused"] == 0
    assert finetune["stages"][1]["matrix"]["1"] != frozen["stages"][1]["matrix"]["1"]

    # The summaries of results.json are those of the recorded matrix.
    for res in (frozen, finetune):
        auc = {s["train_stage"]: {int(j): m["auc"] for j, m in s["matrix"].items()} for s in res["stages"]}
        assert res["summary"]["matrix"]["metrics"]["auc"] == summaries(auc)
        logloss = {
            s["train_stage"]: {int(j): m["logloss"] for j, m in s["matrix"].items()} for s in res["stages"]
        }
        assert res["summary"]["matrix"]["metrics"]["logloss"] == summaries(logloss, higher_is_better=False)
    stats = frozen["summary"]["matrix"]["metrics"]["auc"]
    assert (
        stats["bwt"] == 0.0 and stats["forgetting"] == 0.0 and stats["fwt"] == 0.0
    )  # a model that never moves


def test_test_rows_held_out_of_training_under_next_stage(matrix_run, sunny_dir: Path, tmp_path: Path) -> None:
    cfg = matrix_run
    pools = prepare_data(cfg).pools
    plain = prepare_data(tiny_config(sunny_dir, tmp_path, **LEARN)).pools  # eval.stages: next
    for s, p in pools.items():
        held = evaluation_rows(pools, s, cfg.eval.max_samples, cfg.eval.seed)
        assert len(held) == 40 and np.array_equal(held, evaluation_rows(plain, s, 40, cfg.eval.seed))
        assert not np.intersect1d(held, p.train).size and not np.intersect1d(held, p.valid).size
        assert len(p.train) + len(p.valid) + len(
            np.intersect1d(held, np.r_[plain[s].train, plain[s].valid])
        ) == (len(plain[s].train) + len(plain[s].valid))
    with pytest.raises(DataError, match=r"eval\.max_samples"):
        prepare_data(tiny_config(sunny_dir, tmp_path, **{"eval.stages": "seen", "eval.max_samples": "null"}))


def test_hold_out_histories_keeps_held_out_labels_out_of_training_prompts(
    matrix_run, sunny_dir: Path, tmp_path: Path
) -> None:
    """A held-out row's interaction appears in the histories of its user's later rows, in its own stage and
    later ones (whose models are scored on it too); with `eval.hold_out_histories` those rows leave training
    and validation."""
    for protocol, drop in [(p, d) for p in ("next_stage", "leave_last_out") for d in (False, True)]:
        # (leave_last_out's test rows are apart from training already: their readers were kept before)
        over = {"eval.stages": "all", "eval.hold_out_histories": drop, "protocol": protocol}
        cfg = tiny_config(sunny_dir, tmp_path / f"{protocol}-{drop}", **LEARN, **over)
        prepared = prepare_data(cfg)
        df = prepared.table.df
        users, items, stages = df["user_id"].to_list(), df["item_id"].to_list(), df["stage"].to_list()
        histories = df["hist_items"].to_list()
        held_stage = {
            (users[h], items[h]): stages[h]
            for s in prepared.pools
            for h in evaluation_rows(prepared.pools, s, cfg.eval.max_samples, cfg.eval.seed).tolist()
        }
        leaks = {"same stage": 0, "later stage": 0}
        for p in prepared.pools.values():
            for r in np.r_[p.train, p.valid].tolist():
                for item in histories[r]:
                    if (users[r], item) in held_stage:
                        leaks["same stage" if held_stage[(users[r], item)] == p.stage else "later stage"] += 1
        if drop:
            assert leaks == {"same stage": 0, "later stage": 0}, (protocol, leaks)
        else:
            assert leaks["same stage"] > 0 or protocol == "leave_last_out", leaks
            assert leaks["later stage"] > 0, (protocol, leaks)
    # a key added since experiments were recorded: at its default it leaves the experiment's key alone
    from evolora.experiment import context_of

    assert "hold_out_histories" not in context_of(matrix_run)["eval"]


def test_diagonal_is_the_ordinary_evaluation_under_leave_last_out(sunny_dir: Path, tmp_path: Path) -> None:
    # leave_last_out tests a model on its own stage: pools do not change, so a `seen` run's diagonal is a
    # `next` run's metrics (a separate experiment, computed again).
    common = {**LEARN, "protocol": "leave_last_out", "staging.n_stages": 3, "strategies": "[finetune]"}
    seen = tiny_config(sunny_dir, tmp_path / "seen", **common, **{"eval.stages": "seen"})
    plain = tiny_config(sunny_dir, tmp_path / "plain", **common)
    (a,), (b,) = run_experiment(seen), run_experiment(plain)
    assert [list(s["matrix"]) for s in a["stages"]] == [["1"], ["1", "2"], ["1", "2", "3"]]
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sa["matrix"][str(sa["train_stage"])] == pytest.approx(sb["metrics"], abs=1e-6)
        assert "matrix" not in sb
    assert a["summary"]["matrix"]["metrics"]["auc"]["fwt"] is None  # `seen` has no entry of a later stage
    assert "matrix" not in b["summary"]


def test_summaries_by_hand() -> None:
    r = {
        1: {1: 0.80, 2: 0.60, 3: 0.50, 4: 0.55},
        2: {1: 0.70, 2: 0.75, 3: 0.58, 4: 0.52},
        3: {1: 0.65, 2: 0.72, 3: 0.78, 4: 0.60},
    }
    s = summaries(r)
    assert s["average"] == pytest.approx((0.65 + 0.72 + 0.78) / 3)
    assert s["bwt"] == pytest.approx(((0.65 - 0.80) + (0.72 - 0.75)) / 2)
    # stage 1: best 0.80 (t=1) -> 0.65; stage 2: best 0.75 (t=2) -> 0.72
    assert s["forgetting"] == pytest.approx(((0.80 - 0.65) + (0.75 - 0.72)) / 2)
    # j = 3: R[2][3] - R[1][3]; j = 4: R[3][4] - R[1][4]
    assert s["fwt"] == pytest.approx(((0.58 - 0.50) + (0.60 - 0.55)) / 2)
    assert s["plasticity"] == pytest.approx((0.75 + 0.78) / 2)
    # A lower-is-better metric: the same values read as losses flip every transfer's sign.
    lo = summaries(r, higher_is_better=False)
    assert lo["bwt"] == pytest.approx(-s["bwt"]) and lo["fwt"] == pytest.approx(-s["fwt"])
    # as losses, stage 1 went from 0.80 and 0.70 to 0.65 (best drop -0.05), stage 2 from 0.75 to 0.72 (-0.03)
    assert lo["forgetting"] == pytest.approx((-0.05 - 0.03) / 2)
    # A NaN entry is left out; one stage gives no transfer.
    assert summaries({1: {1: 0.7, 2: float("nan")}})["fwt"] is None
    assert summaries({1: {1: 0.7}}) == {
        "average": 0.7, "bwt": None, "forgetting": None, "fwt": None, "plasticity": None,
    }  # fmt: skip


def test_report_shows_summaries_and_draws_heatmaps(matrix_run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evolora.cli import app

    root = Path(matrix_run.output_dir) / matrix_run.name
    result = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "stage-by-stage matrix" in text
    finetune = _results(matrix_run, "finetune")["summary"]["matrix"]["metrics"]["auc"]
    section = text.split("stage-by-stage matrix")[1].split("LOGLOSS:")[0]
    row = next(line for line in section.splitlines() if line.startswith("| finetune |"))
    assert f"| {finetune['bwt']:+.4f} [" in row and f"| {finetune['plasticity']:.4f} [" in row
    # Intervals over row resamples: a model that never changes keeps exactly its own entries in every draw.
    frozen_row = next(line for line in section.splitlines() if line.startswith("| frozen |"))
    assert "| +0.0000 [+0.0000, +0.0000] | +0.0000 [+0.0000, +0.0000] |" in frozen_row
    lo, hi = map(float, row.split("|")[3].split("[")[1].rstrip("] ").split(","))  # finetune's BWT
    assert lo < hi
    assert (tmp_path / "auc-matrix.png").stat().st_size > 10_000
    # Each method against finetune: the difference of the recorded summaries, with a paired interval.
    diff = text.split("AUC, difference to finetune:")[1].split("LOGLOSS")[0]
    frozen_diff = next(line for line in diff.splitlines() if line.startswith("| frozen |"))
    frozen = _results(matrix_run, "frozen")["summary"]["matrix"]["metrics"]["auc"]
    assert f"{frozen['bwt'] - finetune['bwt']:+.4f}" in frozen_diff.split("|")[4]
    assert not any(line.startswith("| finetune |") for line in diff.splitlines())


def test_differences_are_paired_in_rows_and_seeds(matrix_run) -> None:
    """A method with finetune's very predictions differs from it by exactly 0 in every resample, while its
    own interval is as wide as finetune's: the rows (and seeds) drawn are shared."""
    from dataclasses import replace

    from evolora.eval.matrix_report import _Draws, difference_table
    from evolora.eval.report import group_runs
    from evolora.eval.runs import find_results

    groups = group_runs(find_results([Path(matrix_run.output_dir) / matrix_run.name]))
    finetune = next(g for g in groups if g.method == "finetune")
    twin = replace(finetune, method="twin")
    boot = _Draws([*groups, twin], "auc", draws=200, seed=0)
    own = boot.interval("twin")
    assert own == boot.interval("finetune") and own["average"][0] < own["average"][1]
    assert all(iv == (0.0, 0.0) for iv in boot.difference("twin", "finetune", {0}).values())
    assert boot.difference("frozen", "finetune", {0})["average"] != (0.0, 0.0)
    # A seed the twin has not finished is not compared: summaries at different last stages differ in kind.
    unfinished = replace(twin, runs=[{**r, "stages": r["stages"][:1]} for r in twin.runs])
    table = difference_table([finetune, twin], "auc", boot, "finetune")
    assert table is not None and "| twin | 1 | +0.0000 [+0.0000, +0.0000] |" in table
    assert difference_table([finetune, unfinished], "auc", boot, "finetune") is None


def test_fourteen_methods_get_distinct_lines(tmp_path: Path) -> None:
    from evolora.eval.plots import line_style, plot_metric
    from evolora.eval.report import MethodRuns

    styles = [line_style(i) for i in range(40)]
    assert len(set(styles)) == 40 and len({s[:2] for s in styles}) == 40  # colour + dash alone differ
    groups = [
        MethodRuns(
            f"m{i}",
            "d",
            "ctr",
            [{"stages": [{"eval_stage": t, "metrics": {"auc": 0.5 + i / 100}} for t in (2, 3)]}],
        )
        for i in range(14)
    ]
    plot_metric(groups, "auc", tmp_path / "auc.png")
    assert (tmp_path / "auc.png").stat().st_size > 10_000


def test_sample_counts_come_from_the_most_finished_run() -> None:
    """An unfinished run first in the table (sorted by name) must not hide the later stages' counts."""
    from evolora.eval.report import MethodRuns, stage_sizes

    def run(stages: range) -> dict:
        return {"stages": [{"eval_stage": t, "n_eval": 100 + t, "metrics": {}} for t in stages]}

    groups = [
        MethodRuns("a-unfinished", "d", "ctr", [run(range(2, 3))]),
        MethodRuns("b", "d", "ctr", [run(range(2, 5))]),
    ]
    assert stage_sizes(groups) == "D2: 102, D3: 103, D4: 104"


def test_run_prints_the_summaries(matrix_run, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.config import config_to_dict

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(matrix_run)))
    result = CliRunner().invoke(app, ["run", str(config)])  # finished: prints its tables again
    assert result.exit_code == 0, result.output
    assert "stage-by-stage matrix" in result.output
    bwt = _results(matrix_run, "finetune")["summary"]["matrix"]["metrics"]["auc"]["bwt"]
    assert f"{bwt:+.4f}" in result.output


def test_a_seed_that_stopped_earlier_stays_out_of_the_summary_table(matrix_run) -> None:
    """A seed recorded through stage 1 of 2 beside one through stage 2: its `average` is over fewer stages,
    so the summary table (like the difference table) leaves it out and names it."""
    from evolora.eval.matrix_report import matrix_section, summary_table
    from evolora.eval.report import MethodRuns

    run = _results(matrix_run, "finetune")
    early = {**run, "seed": 1, "complete": False, "stages": run["stages"][:1]}
    groups = [MethodRuns("finetune", "d", "ctr", [run, early])]
    table = summary_table(groups, "auc")
    row = next(line for line in table.splitlines() if line.startswith("| finetune |"))
    assert f"| {run['summary']['matrix']['metrics']['auc']['average']:.4f} |" in row and "(n=2)" not in row
    section = "\n".join(matrix_section(groups, ["auc"], "auc"))
    assert "finetune seed 1 (through stage 1 of 2)" in section


def test_seeds_stopped_at_the_same_earlier_stage_stay_out_of_differences_and_heatmaps(matrix_run) -> None:
    """Seed 1 of both methods through stage 1 of 2: the difference table paired it (the summaries of one
    stage averaged with seed 0's of two, beside a summary table that left it out), and the heatmap averaged
    its row t=1 with seed 0's while row t=2 held seed 0 alone."""
    from dataclasses import replace

    from evolora.eval.matrix_report import _Draws, difference_table, heatmap_cells
    from evolora.eval.report import group_runs
    from evolora.eval.runs import find_results

    groups = group_runs(find_results([Path(matrix_run.output_dir) / matrix_run.name]))
    finetune = next(g for g in groups if g.method == "finetune")
    early = {**finetune.runs[0], "seed": 1, "complete": False, "stages": finetune.runs[0]["stages"][:1]}
    shifted = [{j: {**m, "auc": m["auc"] + 0.1} for j, m in s["matrix"].items()} for s in early["stages"]]
    early["stages"] = [{**s, "matrix": m} for s, m in zip(early["stages"], shifted, strict=True)]
    base = replace(finetune, runs=[finetune.runs[0], early])
    twin = replace(base, method="twin")
    boot = _Draws([base, twin], "auc", draws=50, seed=0)
    table = difference_table([base, twin], "auc", boot, "finetune")
    assert table is not None and "| twin | 1 |" in table
    means, titles = heatmap_cells([base], "auc")
    alone, _ = heatmap_cells([replace(finetune, runs=[finetune.runs[0]])], "auc")
    assert means["finetune"] == alone["finetune"] and titles["finetune"] == "finetune (1 of 2 seeds)"
