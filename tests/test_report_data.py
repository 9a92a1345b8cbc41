"""report.json: the report's numbers as data, equal to report.md's cells and to the runs' own records."""

from __future__ import annotations

import json
import math
import re
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


def test_the_python_api_gives_the_same_report(tmp_path: Path) -> None:
    import evolora

    _write_runs(tmp_path)
    same = compose_report([tmp_path])
    for given in (str(tmp_path), tmp_path, [tmp_path / "finetune", tmp_path / "strong"]):
        report = evolora.report(given)
        assert report.data == same.data and report.text == same.text
    assert "differences" not in evolora.report(tmp_path / "strong").data  # no baseline among the runs
