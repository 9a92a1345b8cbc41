"""The report: its paired bootstrap on stored predictions (rows and seeds resampled, `decided` when 0 is out)
and what it says about the rows it compares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evolora.eval.bootstrap import bootstrap_differences, difference_table
from evolora.eval.report import group_runs, shared_first_stage
from evolora.io import save_npz


def _run(folder: Path, method: str, seed: int, scores: dict[int, np.ndarray], truth: np.ndarray) -> dict:
    stages = []
    for t, s in scores.items():
        (folder / f"stage-{t}").mkdir(parents=True)
        rows = np.arange(len(truth))
        save_npz(folder / f"stage-{t}" / "predictions.npz", {"scores": s, "rows": rows, "truth": truth})
        stages.append({"train_stage": t, "eval_stage": t + 1, "metrics": {"auc": 0.5}})
    return {"method": method, "dataset": "d", "task": "ctr", "seed": seed, "stages": stages,
            "_path": str(folder / "results.json")}  # fmt: skip


def paired_bootstrap(groups: list, metric: str, draws: int) -> str:
    """The report's difference table (markdown) against finetune."""
    return difference_table(bootstrap_differences(groups, metric, draws=draws), metric, "finetune")


def test_decided_only_when_the_interval_leaves_zero_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 120).astype(float)
    results = []
    for seed in range(3):
        noise = {t: rng.random(120) for t in (1, 2)}
        base = {t: 0.2 * truth + noise[t] for t in (1, 2)}  # a weak model
        strong = {t: truth + 0.3 * rng.random(120) for t in (1, 2)}  # nearly separates the classes
        for method, scores in (("finetune", base), ("same", base), ("strong", strong)):
            results.append(_run(tmp_path / method / f"seed{seed}", method, seed, scores, truth))
    table = paired_bootstrap(group_runs(results), "auc", draws=300)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"same", "strong"}
    # Identical predictions: every draw's difference is 0, so nothing is decided.
    assert "| +0.0000 | [+0.0000, +0.0000] | 0.00 | no |" in rows["same"]
    cells = [c.strip() for c in rows["strong"].split("|")]
    lo, hi = (float(x) for x in cells[3].strip("[]").split(","))
    assert 0 < lo <= float(cells[2]) <= hi and cells[4] == "1.00" and cells[5] == "yes"
    # A method's interval does not depend on which other methods are in the report.
    alone = [r for r in results if r["method"] != "same"]
    table_alone = paired_bootstrap(group_runs(alone), "auc", draws=300)
    assert rows["strong"] in table_alone.splitlines()


def test_llm_and_conventional_next_item_rows_say_their_candidates_differ(tmp_path: Path) -> None:
    import json

    from evolora.eval.report import build_report

    metrics = {"hit@10": 0.1, "ndcg@10": 0.05}
    for method, model in (("finetune", "tiny"), ("sasrec-finetune", "sasrec"), ("mf-frozen", "mf")):
        stage = {"train_stage": 1, "eval_stage": 1, "n_eval": 5, "metrics": metrics}
        run = {"method": method, "dataset": "d", "task": "next_item", "model": model, "seed": 0,
               "complete": True, "stages": [stage]}  # fmt: skip
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps(run))
    text, _ = build_report([tmp_path])
    assert "Candidates differ" in text
    text, _ = build_report([tmp_path / "sasrec-finetune", tmp_path / "mf-frozen"])
    assert "Candidates differ" not in text
    # The LLM ranked among the seen items (`task.candidates: seen`): the rows are aligned.
    run = json.loads((tmp_path / "finetune" / "results.json").read_text())
    (tmp_path / "finetune" / "results.json").write_text(json.dumps({**run, "candidates": "seen"}))
    text, _ = build_report([tmp_path])
    assert "Candidates differ" not in text


def test_next_item_runs_ranking_among_other_candidates_say_so(tmp_path: Path) -> None:
    """Two LLM experiments, one ranking the catalogue, one the seen items: their nll and Hit@K are over other
    sets (only an LLM against a conventional model was said before); so are other items left out
    (task.exclude_history) and conventional ties ordered otherwise (task.ties)."""
    import json

    from evolora.eval.report import build_report

    def write(experiment: str, method: str, model: str, candidates: str, **task: object) -> Path:
        stage = {"train_stage": 1, "eval_stage": 1, "n_eval": 5, "metrics": {"hit@10": 0.1, "ndcg@10": 0.05}}
        run = {"method": method, "dataset": "d", "task": "next_item", "model": model, "seed": 0,
               "complete": True, "stages": [stage], "candidates": candidates}  # fmt: skip
        folder = tmp_path / experiment / method / "seed0"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(run))
        context = {"task": {"name": "next_item", **task}}
        (tmp_path / experiment / "experiment.json").write_text(json.dumps({"context": context}))
        return tmp_path / experiment

    cat = write("cat", "finetune", "tiny", "catalogue")
    seen = write("seen", "finetune-seen", "tiny", "seen")
    text, _ = build_report([cat, seen])
    assert (
        "Candidates differ: every item with a semantic ID: finetune; the items seen by the evaluated stage: "
        "finetune-seen; the same true items of the same rows, ranked among other sets." in text
    )
    rated = write("rated", "mf-finetune", "mf", "seen", exclude_history="rated", ties="random")
    plain = write("plain", "sasrec-finetune", "sasrec", "seen")
    text, _ = build_report([seen, rated, plain])
    assert "Candidates differ" not in text
    assert (
        "Items left out of the rankings differ (task.exclude_history): none: finetune-seen, sasrec-finetune; "
        "every item the user rated before: mf-finetune." in text
    )
    assert (
        "Equal scores are ordered otherwise (task.ties): in a fixed random order: mf-finetune; to the item "
        "seen first: sasrec-finetune." in text
    )
    text, _ = build_report([seen, plain])
    assert "Candidates differ" not in text and " differ (task." not in text and "(task.ties)" not in text


def _first_stage(method: str, seed: int, context: str, auc: float) -> dict:
    stages = [{"eval_stage": 2, "metrics": {"auc": auc}}, {"eval_stage": 3, "metrics": {"auc": 0.6}}]
    return {"method": method, "seed": seed, "context_key": context, "stages": stages}


def test_first_stage_left_out_when_each_experiment_shares_it() -> None:
    """An LLM experiment and a conventional one each share their own stage-1 model: D2 cannot tell the
    methods of either apart, so it is left out for every row; a real difference inside one keeps it."""
    llm = [_first_stage(m, s, "llm", 0.55 + s / 10) for m in ("finetune", "peso") for s in (0, 1)]
    din = [_first_stage(m, s, "din", 0.75) for m in ("din-frozen", "din-finetune") for s in (0, 1)]
    assert shared_first_stage(llm + din) == 2
    assert shared_first_stage(llm + din[:1]) == 2  # a one-method experiment does not stop it
    assert shared_first_stage([*din[:1], _first_stage("mf", 0, "mf", 0.7)]) is None  # nothing shared
    broken = [*llm, _first_stage("lsat", 0, "llm", 0.99)]
    assert shared_first_stage(broken + din) is None
    # two experiments of one setting (one context_key), each of one method on its own seed: no seed scored
    # two methods, so nothing says they share D2 (they were said to, and D2 left out of their means)
    apart = [_first_stage("finetune", 7, "same", 0.81), _first_stage("frozen", 8, "same", 0.93)]
    assert shared_first_stage(apart) is None


def test_differences_can_be_taken_against_another_method(tmp_path: Path) -> None:
    import json

    import pytest

    from evolora.errors import EvoloraError
    from evolora.eval.report import build_report

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 80).astype(float)
    for seed in range(2):
        weak = {t: 0.2 * truth + rng.random(80) for t in (1, 2)}
        strong = {t: truth + 0.3 * rng.random(80) for t in (1, 2)}
        for method, scores in (("gru4rec-finetune", strong), ("gru4rec-frozen", weak)):
            run = _run(tmp_path / method / f"seed{seed}", method, seed, scores, truth)
            run.pop("_path")
            run["stages"] = [{**s, "n_eval": 80} for s in run["stages"]]
            run["complete"] = True
            (tmp_path / method / f"seed{seed}" / "results.json").write_text(json.dumps(run))
    # No method is called finetune: without a baseline there is nothing to difference against.
    text, _ = build_report([tmp_path])
    assert "Paired bootstrap" not in text and "vs finetune" not in text
    text, _ = build_report([tmp_path], baseline="gru4rec-finetune")
    assert "difference to gru4rec-finetune" in text and "| vs gru4rec-finetune |" in text
    row = next(line for line in text.splitlines() if line.startswith("| gru4rec-frozen | -"))
    cells = [c.strip() for c in row.split("|")]
    assert float(cells[2]) < 0 and cells[4] == "0.00" and cells[5] == "yes"
    with pytest.raises(EvoloraError, match="--baseline sasrec-finetune: no such method"):
        build_report([tmp_path], baseline="sasrec-finetune")
    # The default is lenient when no finetune ran, but naming it is a promise the runs must keep.
    with pytest.raises(EvoloraError, match="--baseline finetune: no such method"):
        build_report([tmp_path], baseline="finetune")


def _interval(table: str, method: str) -> tuple[float, float]:
    line = next(row for row in table.splitlines()[2:] if row.split("|")[1].strip() == method)
    lo, hi = (float(x) for x in line.split("|")[3].strip().strip("[]").split(","))
    return lo, hi


def test_seeds_that_agree_do_not_narrow_the_row_interval(tmp_path: Path) -> None:
    # Three seeds whose predictions are identical carry no more information about the users than one:
    # the same users are tested at every seed, so the interval must not shrink by sqrt(3).
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 200).astype(float)
    base = {t: 0.3 * truth + rng.random(200) for t in (1, 2)}
    other = {t: 0.5 * truth + rng.random(200) for t in (1, 2)}
    widths = {}
    for n_seeds in (1, 3):
        results = []
        for seed in range(n_seeds):
            for method, scores in (("finetune", base), ("other", other)):
                results.append(
                    _run(tmp_path / f"n{n_seeds}" / method / f"seed{seed}", method, seed, scores, truth)
                )
        lo, hi = _interval(paired_bootstrap(group_runs(results), "auc", draws=600), "other")
        widths[n_seeds] = hi - lo
    assert 0.8 < widths[3] / widths[1] < 1.25, widths


def test_runs_a_report_cannot_put_side_by_side_are_refused(tmp_path: Path) -> None:
    import json

    import pytest

    from evolora.errors import EvoloraError
    from evolora.eval.report import build_report

    def write(experiment: str, method: str, seed: int, **fields: str) -> Path:
        stage = {"train_stage": 1, "eval_stage": 2, "n_eval": 5, "metrics": {"auc": 0.6}}
        run = {"method": method, "dataset": "d", "task": "ctr", "seed": seed, "stages": [stage], **fields}
        folder = tmp_path / experiment / method / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(run))
        return tmp_path / experiment

    a = write("a", "finetune", 0)
    write("a", "finetune", 1)
    # An experiment named together with one of its runs: each file read once (not an extra seed).
    text, _ = build_report([a, a / "finetune", a / "finetune" / "seed1" / "results.json"])
    assert "| finetune | 2 |" in text
    assert "their mean ± their standard deviation (the population one, ddof=0" in text
    other_data = write("b", "frozen", 0, dataset="elsewhere")
    with pytest.raises(EvoloraError, match=r"different datasets: d \(.*a\); elsewhere \(.*b\)"):
        build_report([a, other_data])
    other_task = write("c", "frozen", 0, task="next_item")
    with pytest.raises(EvoloraError, match=r"different tasks: ctr .*; next_item .*one report per task"):
        build_report([a, other_task])
    # next_stage tests a stage's predecessor on all of it, leave_last_out the stage on its users' last rows
    next_stage = write("f", "frozen", 0, protocol="next_stage")
    last_out = write("g", "peso", 0, protocol="leave_last_out")
    with pytest.raises(
        EvoloraError, match=r"different protocols: next_stage .*; leave_last_out .*per protocol"
    ):
        build_report([next_stage, last_out])
    text, _ = build_report([a, next_stage])  # a run recorded before the protocol was: not refused for it
    assert "| frozen |" in text
    twin = write("e", "finetune", 1)  # another experiment's finetune, seed 1 again
    with pytest.raises(EvoloraError, match=r"two runs of finetune with seed 1: .*another `label`"):
        build_report([a, twin])


def test_a_run_with_no_evaluated_stage_is_named_not_a_traceback(tmp_path: Path) -> None:
    import json

    import pytest

    from evolora.errors import EvoloraError
    from evolora.eval.report import build_report

    stage = {"train_stage": 1, "eval_stage": 2, "n_eval": 5, "metrics": {"auc": 0.6}}
    for method, stages in (("finetune", [stage]), ("frozen", [])):  # frozen: a one-stage next_stage run
        run = {"method": method, "dataset": "d", "task": "ctr", "model": "tiny", "seed": 0,
               "complete": True, "stages": stages}  # fmt: skip
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps(run))
    with pytest.raises(EvoloraError, match=r"frozen \(seed 0\) has no evaluated stage"):
        build_report([tmp_path])


def test_a_stage_where_the_metric_is_undefined_keeps_its_column_and_is_named(tmp_path: Path) -> None:
    """AUC is undefined on a stage whose samples share one label: its column stays (as "–") and the report
    says the means leave it out, instead of dropping the column under "means cover every evaluated stage"."""
    import json

    from evolora.eval.report import build_report

    for method, auc in (("finetune", 0.6), ("frozen", 0.55)):
        stages = [
            {"train_stage": 1, "eval_stage": 2, "n_eval": 5, "metrics": {"auc": auc}},
            {"train_stage": 2, "eval_stage": 3, "n_eval": 5, "metrics": {"auc": None}},
        ]
        run = {"method": method, "dataset": "d", "task": "ctr", "model": "tiny", "seed": 0,
               "complete": True, "stages": stages}  # fmt: skip
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps(run))
    text, _ = build_report([tmp_path])
    table = text[text.index("### AUC per evaluated stage") :]
    assert "| method | seeds | D2 | D3 | mean |" in table
    assert "| frozen | 1 | 0.5500 | – | 0.5500 |" in table
    assert "AUC is undefined on D3 for every method" in table


def test_draws_a_metric_cannot_judge_are_left_out_quietly(tmp_path: Path) -> None:
    """Three rows: many resamples hold one label, where AUC is undefined; they are left out of the interval
    without numpy's 'Mean of empty slice' warning on the user's stderr."""
    import warnings

    truth = np.array([0.0, 1.0, 1.0])
    results = [
        _run(tmp_path / m, m, 0, {1: s, 2: s}, truth)
        for m, s in (("finetune", np.array([0.2, 0.6, 0.4])), ("other", np.array([0.1, 0.9, 0.8])))
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = bootstrap_differences(group_runs(results), "auc", draws=200)
    other = next(r for r in rows if r["method"] == "other")
    assert other["low"] <= other["difference"] <= other["high"] and 0 <= other["p_better"] <= 1


def test_a_stage_where_auc_is_undefined_leaves_the_point_difference_defined(tmp_path: Path) -> None:
    """Stage 2's rows share one label: the difference is stage 1's, as the table's means leave stage 2 out."""
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 60).astype(float)
    truth[:2] = [0.0, 1.0]
    results = []
    for method, weight in (("finetune", 0.3), ("strong", 1.0)):
        folder = tmp_path / method / "seed0"
        stages = []
        for t, labels in ((1, truth), (2, np.ones(60))):
            (folder / f"stage-{t}").mkdir(parents=True)
            scores = weight * labels + rng.random(60)
            save_npz(
                folder / f"stage-{t}" / "predictions.npz",
                {"scores": scores, "rows": np.arange(60), "truth": labels},
            )
            stages.append({"train_stage": t, "eval_stage": t + 1, "metrics": {"auc": 0.5}})
        results.append({"method": method, "dataset": "d", "task": "ctr", "seed": 0, "stages": stages,
                        "_path": str(folder / "results.json")})  # fmt: skip
    from evolora.eval.metrics import auc

    arrays = {
        m: np.load(tmp_path / m / "seed0" / "stage-1" / "predictions.npz") for m in ("finetune", "strong")
    }
    expected = auc(truth, arrays["strong"]["scores"]) - auc(truth, arrays["finetune"]["scores"])
    row = next(
        r for r in bootstrap_differences(group_runs(results), "auc", draws=50) if r["method"] == "strong"
    )
    assert row["difference"] == pytest.approx(expected)
    assert row["low"] <= row["difference"] <= row["high"]


def test_a_metric_a_run_does_not_store_is_undefined_not_a_crash(tmp_path: Path) -> None:
    """LSAT's next-item ensemble stores no target_logp_valid: nll_valid has no paired difference for it, and
    the arrays give NaN (the forgetting matrix's bootstrap computes every metric from them)."""
    from evolora.eval.metrics import RANKING_METRICS

    results = []
    for method in ("finetune", "lsat"):
        folder = tmp_path / method / "seed0"
        arrays = {"items": np.tile(np.arange(10), (8, 1)), "truth": np.arange(8), "rows": np.arange(8),
                  "target_logp": -np.ones(8)}  # fmt: skip
        if method == "finetune":
            arrays["target_logp_valid"] = -np.ones(8)
        (folder / "stage-1").mkdir(parents=True)
        save_npz(folder / "stage-1" / "predictions.npz", arrays)
        stages = [{"train_stage": 1, "eval_stage": 2, "metrics": {"nll": 1.0}}]
        results.append({"method": method, "dataset": "d", "task": "next_item", "seed": 0, "stages": stages,
                        "_path": str(folder / "results.json")})  # fmt: skip
    rows = bootstrap_differences(group_runs(results), "nll_valid", draws=20)
    assert rows == [{"method": "lsat", "difference": None, "why": "no paired predictions"}]
    assert bootstrap_differences(group_runs(results), "nll", draws=20)[0]["difference"] == 0.0
    lsat = dict(np.load(tmp_path / "lsat" / "seed0" / "stage-1" / "predictions.npz"))
    assert np.isnan(RANKING_METRICS.on_arrays(lsat, slice(None), "nll_valid"))


def test_experiments_scored_on_other_rows_of_the_same_count_are_refused(tmp_path: Path) -> None:
    """Another eval.seed draws as many rows, not the same ones: the report names it instead of calling the
    comparison paired ("All methods are scored on the same evaluation rows")."""
    import json

    from evolora.errors import EvoloraError
    from evolora.eval.report import build_report

    rng = np.random.default_rng(0)
    for experiment, method, rows in (("a", "finetune", np.arange(40)), ("b", "frozen", np.arange(40) + 40)):
        folder = tmp_path / experiment / method / "seed0"
        (folder / "stage-1").mkdir(parents=True)
        arrays = {"scores": rng.random(40), "rows": rows, "truth": rng.integers(0, 2, 40).astype(float)}
        save_npz(folder / "stage-1" / "predictions.npz", arrays)
        stage = {"train_stage": 1, "eval_stage": 2, "n_eval": 40, "n_eval_total": 80, "metrics": {"auc": 0.5}}
        run = {"method": method, "dataset": "d", "task": "ctr", "model": "tiny", "seed": 0, "complete": True,
               "stages": [stage]}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(run))
    with pytest.raises(EvoloraError, match=r"D2 is evaluated on other samples in .*a than in .*b"):
        build_report([tmp_path / "a", tmp_path / "b"])
    text, _ = build_report([tmp_path / "a"])
    assert "finetune" in text


def test_ctr_experiments_whose_rows_carry_other_labels_are_refused(tmp_path: Path) -> None:
    """The same rows judged against other labels (another data.like_threshold) were paired by the bootstrap,
    which called a difference of ground truths decided."""
    import json

    from evolora.errors import EvoloraError
    from evolora.eval.report import build_report

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 40)
    for experiment, method, labels in (
        ("a", "finetune", truth),
        ("b", "frozen", 1 - truth),
        ("c", "peso", truth),
    ):
        folder = tmp_path / experiment / method / "seed0"
        (folder / "stage-1").mkdir(parents=True)
        # the same labels in another dtype (an ID model's, say) are the same labels
        labels = labels.astype(np.int8 if experiment == "c" else float)
        save_npz(folder / "stage-1" / "predictions.npz", {"scores": rng.random(40), "rows": np.arange(40),
                                                          "truth": labels})  # fmt: skip
        stage = {"train_stage": 1, "eval_stage": 2, "n_eval": 40, "n_eval_total": 80, "metrics": {"auc": 0.5}}
        run = {"method": method, "dataset": "d", "task": "ctr", "model": "tiny", "seed": 0, "complete": True,
               "stages": [stage]}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(run))
    with pytest.raises(
        EvoloraError, match=r"D2's samples carry other labels in .*a than in .*b .*like_thresh"
    ):
        build_report([tmp_path / "a", tmp_path / "b"])
    text, _ = build_report([tmp_path / "a", tmp_path / "c"])
    assert "| peso |" in text


def test_a_mean_over_fewer_stages_says_so_and_a_zero_baseline_keeps_its_column(tmp_path: Path) -> None:
    """LSAT's ensemble has no nll_valid after stage 1: its mean covers D2 only, says so, and its gain is on
    D2 alone. A baseline
    whose Hit@5 is 0 has no relative gain, shown as "–" instead of the column vanishing."""
    import json

    from evolora.eval.report import build_report

    for method, valid in (("finetune", [9.0, 8.0]), ("lsat", [9.5, None])):
        stages = [
            {"train_stage": t, "eval_stage": t + 1, "n_eval": 5, "metrics": {"hit@5": 0.0, "nll_valid": v}}
            for t, v in ((1, valid[0]), (2, valid[1]))
        ]
        run = {"method": method, "dataset": "d", "task": "next_item", "model": "tiny", "seed": 0,
               "complete": True, "stages": stages}  # fmt: skip
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps(run))
    text, _ = build_report([tmp_path], metrics=["nll_valid", "hit@5"])
    # ... and its gain is against finetune's D2 (9.0), not finetune's D2..D3 mean (8.5)
    assert "| lsat | 1 | 9.5000 | – | 9.5000 (D2 only; vs on D2) | -5.56% |" in text
    assert "| finetune | 1 | 9.0000 | 8.0000 | 8.5000 |" in text
    hits = text[text.index("HIT@5") :]
    assert "| method | seeds | D2 | D3 | mean | vs finetune |" in hits
    assert "| lsat | 1 | 0.0000 | 0.0000 | 0.0000 | – |" in hits
