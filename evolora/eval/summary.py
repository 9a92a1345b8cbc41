"""The runs of a report grouped by method (`MethodRuns`), and the report as data: `report.json`, written
beside report.md, for scripts and figures of one's own.

It holds the numbers of report.md's main tables, each seed's value kept: per metric and method the seeds,
every evaluated stage's values (one per seed, in the order of `seeds`; null where a seed has none) with
their mean and standard deviation over seeds (the population one, as the tables' ±), the mean over stages
of each seed that finished every stage its method's seeds evaluated (null for one still running: format
2; format 1 averaged such a seed over its own fewer stages), over `averaged_stages` (but a shared first
stage, `left_out_stage`), and its relative gain over the baseline in percent (positive is better, as the
tables' `vs` column) over the stages and the finished seeds both have (`vs_baseline_over`; its seeds empty
where none is common, each side's own then; format 2 took each side's own seeds and the method's stages),
and the paired bootstrap differences to the baseline with their 95% intervals. The forgetting matrix, the
user kinds and the cost table stay in report.md; each run's results.json has them per seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evolora.eval.metrics import is_reference, lower_is_better

# bumped when a key changes meaning (2: a mean over stages is over finished seeds only; 3: the gain over the
# baseline is over the stages and finished seeds both have, `vs_baseline_over`)
FORMAT = 3


@dataclass
class MethodRuns:
    """One method's runs (its seeds) on one dataset and task: the rows of a report."""

    method: str
    dataset: str
    task: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def seed_values(self, metric: str) -> dict[int, dict[Any, float]]:
        """Per evaluated stage: each seed's value (a missing or NaN one left out)."""
        out: dict[int, dict[Any, float]] = defaultdict(dict)
        for i, r in enumerate(self.runs):
            for s in r["stages"]:
                v = s["metrics"].get(metric)
                if _finite(v):  # results.json has a seed; a run built by hand without one is its own
                    out[s["eval_stage"]][r.get("seed", i)] = float(v)
        return dict(out)

    def stage_values(self, metric: str) -> dict[int, list[float]]:
        return {t: list(by_seed.values()) for t, by_seed in self.seed_values(metric).items()}

    def averaged_stages(self, skip: int | None = None) -> set[int]:
        """The evaluated stages a mean over stages covers: every one a seed of the method recorded, but
        `skip`."""
        return {s["eval_stage"] for r in self.runs for s in r["stages"]} - {skip}

    def finished_runs(self) -> list[dict[str, Any]]:
        """The runs (seeds) that recorded every stage any seed of the method did: means over stages and the
        bootstrap take these (a seed still running, averaged over fewer stages, would be a mean of another
        kind); the others are `unfinished_seeds`."""
        every = self.averaged_stages()
        return [r for r in self.runs if {s["eval_stage"] for s in r["stages"]} >= every]

    def unfinished_seeds(self) -> list[str]:
        """'seed s (D2..D3 of D2..D4)' for each seed `finished_runs` leaves out."""
        every = sorted(self.averaged_stages())
        finished = {id(r) for r in self.finished_runs()}
        return [
            f"seed {r.get('seed', i)} ({_span([s['eval_stage'] for s in r['stages']])} of {_span(every)})"
            for i, r in enumerate(self.runs)
            if id(r) not in finished
        ]

    def kind_values(self, metric: str, skip: int | None = None) -> dict[str, list[float]]:
        """Per user kind: the mean over stages (but `skip`) of each finished run (one value per seed)."""
        out: dict[str, list[float]] = defaultdict(list)
        for r in self.finished_runs():
            per_kind: dict[str, list[float]] = defaultdict(list)
            for s in r["stages"]:
                if s["eval_stage"] == skip:
                    continue
                for kind, m in s.get("by_user_kind", {}).items():
                    v = m.get(metric)
                    if v is not None and not math.isnan(v):
                        per_kind[kind].append(v)
            for kind, vals in per_kind.items():
                out[kind].append(float(np.mean(vals)))
        return dict(out)

    def seed_means(
        self, metric: str, skip: int | None = None, stages: set[int] | None = None
    ) -> dict[Any, float]:
        """Per finished run (seed, `finished_runs`): the metric's mean over its evaluated stages where it is
        defined, leaving out stage `skip` (and, given `stages`, any other: a gain compares like stages)."""
        vals = {}
        finished = {id(r) for r in self.finished_runs()}
        for i, r in enumerate(self.runs):  # (a run built by hand without a seed is its own: its position)
            if id(r) not in finished:
                continue
            stage_vals = [
                float(s["metrics"][metric])
                for s in r["stages"]
                if s["eval_stage"] != skip
                and (stages is None or s["eval_stage"] in stages)
                and _finite(s["metrics"].get(metric))
            ]
            if stage_vals:
                vals[r.get("seed", i)] = float(np.mean(stage_vals))
        return vals

    def mean_values(
        self, metric: str, skip: int | None = None, stages: set[int] | None = None
    ) -> list[float]:
        return list(self.seed_means(metric, skip, stages).values())

    def mean_stages(self, metric: str, skip: int | None = None) -> set[int]:
        """The stages its mean of `metric` covers: where a finished seed has a value, but `skip`."""
        finished = MethodRuns(self.method, self.dataset, self.task, self.finished_runs())
        return set(finished.stage_values(metric)) - {skip}

    def gain_basis(
        self, base: MethodRuns, metric: str, skip: int | None = None
    ) -> tuple[set[int], list[Any]]:
        """What a gain over `base` compares: the stages both means cover (a method whose seeds all stopped
        early, LSAT's nll_valid, or a baseline that stopped early is not set against stages the other
        lacks), and the finished seeds both have there, paired as the bootstrap pairs them (so a method
        equal to the baseline seed by seed gains 0 whichever seeds are still running); with no seed in
        common, each side's own (an empty list)."""
        stages = self.mean_stages(metric, skip) & base.mean_stages(metric, skip)
        theirs = base.seed_means(metric, skip, stages)
        return stages, [s for s in self.seed_means(metric, skip, stages) if s in theirs]

    def gain_over(self, base: MethodRuns, metric: str, skip: int | None = None) -> float | None:
        """The relative gain (`relative_gain`) of its mean over the baseline's on `gain_basis`'s stages and
        seeds; None where either has no value there or the baseline's mean is 0."""
        stages, seeds = self.gain_basis(base, metric, skip)
        mine, theirs = self.seed_means(metric, skip, stages), base.seed_means(metric, skip, stages)
        if seeds:
            mine, theirs = {s: mine[s] for s in seeds}, {s: theirs[s] for s in seeds}
        if not mine or not theirs or not float(np.mean(list(theirs.values()))):
            return None
        return relative_gain(list(mine.values()), float(np.mean(list(theirs.values()))), metric)

    def train_seconds(self) -> float:
        """Training seconds of a finished run (the mean over finished seeds: one still running has fewer)."""
        runs = self.finished_runs()
        return float(np.mean([r.get("summary", {}).get("train_seconds", 0.0) for r in runs]))


def _span(stages: list[int]) -> str:
    return f"D{min(stages)}..D{max(stages)}" if len(stages) > 1 else f"D{stages[0]}" if stages else "none"


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def relative_gain(means: list[float], base_mean: float, metric: str) -> float:
    """The mean's gain over the baseline's in percent, positive when better (lower-is-better metrics
    turned around)."""
    gain = (float(np.mean(means)) - base_mean) / abs(base_mean) * 100
    return (-gain if lower_is_better(metric) else gain) + 0.0  # + 0.0 turns -0.0 into 0.0


def _spread(values: list[float | None]) -> dict[str, Any]:
    values = [v if v is not None and math.isfinite(v) else None for v in values]  # JSON has no inf or NaN
    known = [v for v in values if v is not None]
    return {
        "values": values,
        "mean": float(np.mean(known)) if known else None,
        "std": float(np.std(known)) if known else None,
    }


def _method(g: MethodRuns, metric: str, skip: int | None) -> dict[str, Any]:
    seeds = [r.get("seed", i) for i, r in enumerate(g.runs)]
    values = g.seed_values(metric)
    # every evaluated stage, a figure undefined in every seed (AUC of one label) as null, not left out
    stages = [
        {"stage": t, **_spread([values.get(t, {}).get(seed) for seed in seeds])} for t in g.averaged_stages()
    ]
    means = g.seed_means(metric, skip)
    return {
        "seeds": seeds,
        "stages": sorted(stages, key=lambda x: x["stage"]),
        "mean": _spread([means.get(s) for s in seeds]),
        "averaged_stages": sorted(g.mean_stages(metric, skip)),
    }


def report_data(
    groups: list[MethodRuns],
    metrics: list[str],
    baseline: str,
    skip: int | None,
    differences: list[dict[str, Any]] | None,
    draws: int,
    lead: str | None,
) -> dict[str, Any]:
    """report.json's content: see the module doc. `differences`: `bootstrap_differences`'s rows for the
    metric `lead` (None without the baseline)."""
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
        base = next((g for g in groups if g.method == baseline), None)
        for g in groups:
            usable = base is not None and not is_reference(metric)
            per[g.method]["vs_baseline_percent"] = g.gain_over(base, metric, skip) if usable else None
            if usable:
                stages, seeds = g.gain_basis(base, metric, skip)
                per[g.method]["vs_baseline_over"] = {"stages": sorted(stages), "seeds": seeds}
        entry["methods"] = per
        out["metrics"][metric] = entry
    if differences is not None:
        out["differences"] = {
            "metric": lead,
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
