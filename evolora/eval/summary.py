"""The report as data: `report.json`, written beside report.md, for scripts and figures of one's own.

It holds the numbers of report.md's main tables, each seed's value kept: per metric and method the seeds,
every evaluated stage's values (one per seed, in the order of `seeds`; null where a seed has none) with
their mean and standard deviation over seeds (the population one, as the tables' ±), the mean over stages
(but a shared first stage, `left_out_stage`) and its relative gain over the baseline in percent (positive
is better, as the tables' `vs` column), and the paired bootstrap differences to the baseline with their 95%
intervals. The forgetting matrix, the user kinds and the cost table stay in report.md; each run's
results.json has them per seed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from evolora.eval.metrics import is_reference, lower_is_better

if TYPE_CHECKING:
    from evolora.eval.report import MethodRuns

FORMAT = 1  # bumped when a key changes meaning


def relative_gain(means: list[float], base_mean: float, metric: str) -> float:
    """The mean's gain over the baseline's in percent, positive when better (lower-is-better metrics
    turned around)."""
    gain = (float(np.mean(means)) - base_mean) / abs(base_mean) * 100
    return (-gain if lower_is_better(metric) else gain) + 0.0  # + 0.0 turns -0.0 into 0.0


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _spread(values: list[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    return {
        "values": values,
        "mean": float(np.mean(known)) if known else None,
        "std": float(np.std(known)) if known else None,
    }


def _method(g: MethodRuns, metric: str, skip: int | None) -> dict[str, Any]:
    seeds = [r["seed"] for r in g.runs]
    by_stage: dict[int, dict[Any, float]] = {}
    for r in g.runs:
        for s in r["stages"]:
            v = s["metrics"].get(metric)
            if _finite(v):
                by_stage.setdefault(s["eval_stage"], {})[r["seed"]] = float(v)
    stages = [{"stage": t, **_spread([v.get(seed) for seed in seeds])} for t, v in sorted(by_stage.items())]
    per_seed_mean = []
    for seed in seeds:
        vals = [vals[seed] for t, vals in by_stage.items() if t != skip and seed in vals]
        per_seed_mean.append(float(np.mean(vals)) if vals else None)
    return {"seeds": seeds, "stages": stages, "mean": _spread(per_seed_mean)}


def report_data(
    groups: list[MethodRuns],
    metrics: list[str],
    baseline: str,
    skip: int | None,
    differences: list[dict[str, Any]] | None,
    draws: int,
) -> dict[str, Any]:
    """report.json's content: see the module doc. `differences`: `bootstrap_differences`'s rows for the
    first metric (None without the baseline)."""
    methods = [g.method for g in groups]
    has_baseline = baseline in methods
    out: dict[str, Any] = {
        "format": FORMAT,
        "datasets": sorted({g.dataset for g in groups}),
        "tasks": sorted({g.task for g in groups}),
        "methods": methods,
        "baseline": baseline if has_baseline else None,
        "left_out_stage": skip,
        "metrics": {},
    }
    for metric in metrics:
        entry: dict[str, Any] = {
            "higher_is_better": not lower_is_better(metric),
            "reference": is_reference(metric),  # a figure of the evaluated rows (log_items), not a score
        }
        per = {g.method: _method(g, metric, skip) for g in groups}
        base = per.get(baseline, {}).get("mean", {}).get("mean")
        for g in groups:
            mean = per[g.method]["mean"]
            known = [v for v in mean["values"] if v is not None]
            usable = has_baseline and not is_reference(metric) and base and known
            per[g.method]["vs_baseline_percent"] = relative_gain(known, base, metric) if usable else None
        entry["methods"] = per
        out["metrics"][metric] = entry
    if differences is not None:
        out["differences"] = {
            "metric": metrics[0],
            "baseline": baseline,
            "draws": draws,
            "interval": 0.95,
            # A non-finite bound (every draw undefined) is null: JSON has no NaN.
            "methods": {
                r["method"]: {
                    k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                    for k, v in r.items()
                    if k != "method"
                }
                for r in differences
            },
        }
    return out
