"""The paired bootstrap behind the report's "difference to finetune" table: every method against one
baseline method on the rows both scored, rows (one resample shared by the seeds) and seeds resampled.
`bootstrap_differences` gives the rows as data (report.json), `difference_table` renders them (report.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from evolora.eval.metrics import RANKING_ARRAY_OF, lower_is_better, metric_set
from evolora.eval.stored import stored_predictions
from evolora.progress import task as progress_task

if TYPE_CHECKING:
    from evolora.eval.summary import MethodRuns

BASELINE = "finetune"  # the method differences are taken against unless the report names another


def _load_stage_arrays(run: dict[str, Any]) -> dict[int, dict[str, np.ndarray]] | None:
    """The protocol's evaluation of each stage, by evaluated stage."""
    stored = stored_predictions(run)
    return None if stored is None else {j: a for row in stored.values() for j, a in row.items()}


def _common_rows(pairs: list[tuple[dict, dict, list[int]]]) -> dict[int, int]:
    """The stages whose evaluated rows are the same (same order) in every seed's pair: stage -> row count."""
    out = {}
    for s in sorted(set().union(*(set(st) for _, _, st in pairs))):
        rows = [m[s]["rows"] for m, _, st in pairs if s in st]
        if len(rows) == len(pairs) and all(np.array_equal(rows[0], r) for r in rows[1:]):
            out[s] = len(rows[0])
    return out


def difference_table(rows: list[dict[str, Any]], metric: str, baseline: str) -> str:
    lines = [
        f"| method | Δ{metric.upper()} vs {baseline} | 95% interval | P(better) | decided |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["difference"] is None:
            lines.append(f"| {r['method']} | – | ({r.get('why', 'no paired predictions')}) | – | – |")
            continue
        if math.isnan(r["difference"]):  # the metric is undefined on every stage (one label)
            lines.append(f"| {r['method']} | – | (undefined on every stage) | – | – |")
            continue
        decided = "yes" if r["decided"] else "no"
        lines.append(
            f"| {r['method']} | {r['difference']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] "
            f"| {r['p_better']:.2f} | {decided} |"
        )
    return "\n".join(lines)


def bootstrap_differences(
    groups: list[MethodRuns],
    metric: str,
    baseline: str = BASELINE,
    draws: int = 1000,
    seed: int = 0,
    skip: int | None = None,
) -> list[dict[str, Any]] | None:
    """Mean-over-stages (but `skip`) difference to the baseline with a 95% interval, resampling rows and
    seeds: one row per other method, `{method, difference, low, high, p_better, decided}` (`difference`
    None where the two share no paired predictions); None without the baseline among the groups.

    Every strategy is scored on the same rows, so rows are resampled jointly (paired) within each stage; the
    seeds present in both runs are averaged, and with several of them each draw also resamples the seeds
    (a two-level bootstrap: the interval covers training noise as well as which rows were evaluated). The
    seeds score the same rows (the evaluation draw has its own seed), so a draw's resample of a stage's rows
    is shared by every seed, as in the matrix summaries' bootstrap; redrawing rows per seed, as this did
    before 2026-12-01, counts the same users' luck as independent at every seed and narrows the interval.
    Stages whose rows differ between seeds are resampled per seed. P(better) is the share of draws where
    the method wins; `decided` says whether the interval excludes zero. Every method's draws start from
    the same seed, so methods with the same seeds and rows are resampled alike, and a method's interval
    does not depend on which others are in the report.
    """
    base = next((g for g in groups if g.method == baseline), None)
    if base is None:
        return None
    on_arrays = metric_set(base.task).on_arrays

    def fn(arrays: dict[str, np.ndarray], idx: Any) -> float:
        return on_arrays(arrays, idx, metric)

    sign = -1.0 if lower_is_better(metric) else 1.0
    base_runs = {r["seed"]: _load_stage_arrays(r) for r in base.finished_runs()}  # as the table's means
    rows: list[dict[str, Any]] = []
    others = [g for g in groups if g.method != baseline]
    with progress_task(f"bootstrap vs {baseline}", total=len(others)) as bar:
        for g in others:
            rows.append(_difference(g, base_runs, metric, fn, sign, draws, seed, skip))
            bar.advance()
    return rows


def _difference(
    g: MethodRuns,
    base_runs: dict[Any, Any],
    metric: str,
    fn: Callable[[dict[str, np.ndarray], Any], float],
    sign: float,
    draws: int,
    seed: int,
    skip: int | None,
) -> dict[str, Any]:
    """One method's row of `bootstrap_differences`."""
    rng = np.random.default_rng(seed)
    pairs, only_skipped = [], False
    for r in g.finished_runs():
        mine, theirs = _load_stage_arrays(r), base_runs.get(r["seed"])
        if mine is None or theirs is None:
            continue
        stages = sorted((set(mine) & set(theirs)) - {skip})
        only_skipped |= not stages and skip in set(mine) & set(theirs)
        needed = {RANKING_ARRAY_OF[metric]} if metric in RANKING_ARRAY_OF else set()
        if (
            stages
            and all(np.array_equal(mine[s]["rows"], theirs[s]["rows"]) for s in stages)
            and all(needed <= set(a[s]) for a in (mine, theirs) for s in stages)
        ):
            pairs.append((mine, theirs, stages))
    if not pairs:  # (a stage shared by every method alone, left out, is no pair: said so)
        why = f"no stage but D{skip}, which every method shares" if only_skipped else "no paired predictions"
        return {"method": g.method, "difference": None, "why": why}
    diffs = np.empty(draws)
    # Stages where the metric is undefined (AUC on one label) are left out, as in the table's means.
    per_pair = [
        _defined_mean([fn(m[s], slice(None)) - fn(b[s], slice(None)) for s in st]) for m, b, st in pairs
    ]
    point = _defined_mean(per_pair)
    common = _common_rows(pairs)
    for d in range(draws):
        # One resample of a stage's rows serves every seed that scored the same rows: the users
        # are the same at every seed, so redrawing them per seed would understate the interval.
        shared = {s: rng.integers(0, n, n) for s, n in common.items()}
        per_seed = []
        chosen = rng.integers(0, len(pairs), len(pairs)) if len(pairs) > 1 else [0]
        for m, b, st in (pairs[i] for i in chosen):
            vals = []
            for s in st:
                n = len(m[s]["rows"])
                idx = shared[s] if s in shared else rng.integers(0, n, n)
                vals.append(fn(m[s], idx) - fn(b[s], idx))
            # A resample whose rows share one label leaves AUC undefined on every stage: that draw is
            # left out (quietly: numpy would warn of an empty mean on stderr).
            per_seed.append(_defined_mean(vals))
        diffs[d] = np.mean(per_seed)
    diffs = diffs[~np.isnan(diffs)]
    lo, hi = np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (np.nan, np.nan)
    return {
        "method": g.method, "difference": float(point), "low": float(lo), "high": float(hi),
        "p_better": float(np.mean(sign * diffs > 0)) if len(diffs) else float("nan"),
        "decided": bool(lo > 0 or hi < 0),
    }  # fmt: skip


def _defined_mean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN when none is (without numpy's empty-mean warning)."""
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")
