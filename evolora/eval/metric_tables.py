"""The report's tables per metric: methods x evaluated stages with each method's mean over stages and its
gain over the baseline (what that gain compares is `MethodRuns.gain_basis`, and a row says where it is not
the two means over the table's stages), the user kinds' means, the evaluated rows per stage and the
reference figures (`log_items`). `eval/report.py` puts them together with the other sections."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from evolora.eval.bootstrap import BASELINE
from evolora.eval.summary import MethodRuns


def _fmt(vals: list[float], digits: int = 4) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


def metric_table(
    groups: list[MethodRuns], metric: str, skip: int | None = None, baseline: str = BASELINE
) -> str:
    """Methods x evaluated stages, with the mean over stages (but `skip`) and the relative gain vs
    the baseline method."""
    # Every evaluated stage is a column, one where the metric is undefined too (shown as "–"): a column
    # that vanished would hide that the mean leaves it out.
    stages = evaluated_stages(groups)
    base = next((g for g in groups if g.method == baseline), None)
    head = ["method", "seeds", *[f"D{s}" for s in stages], "mean"]
    with_gain = base is not None and bool(base.mean_values(metric, skip))
    if with_gain:
        head.append(f"vs {baseline}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # A method without the metric on a stage others have it on (LSAT's nll_valid), or whose seeds have all
    # stopped early, averages fewer stages: its mean says which, rather than standing beside the others' as
    # if alike; a cell with fewer seeds than its row says how many it holds.
    averaged = {s for g in groups for s in g.stage_values(metric)} - {skip}
    for g in groups:
        vals = g.stage_values(metric)
        means = g.mean_values(metric, skip)  # of its finished seeds: "(n=k)" where some are still running
        mean = _fmt(means) + _fewer(means, len(g.runs))
        notes = []
        if means and (mine := g.mean_stages(metric, skip)) != averaged:
            notes.append(_stage_list(mine) + " only")
        if means and with_gain:
            notes.extend(_gain_notes(g, base, metric, skip, averaged))
        mean += f" ({'; '.join(notes)})" if notes else ""
        cells = [_fmt(vals.get(s, [])) + _fewer(vals.get(s, []), len(g.runs)) for s in stages]
        row = [g.method, str(len(g.runs)), *cells, mean]
        if with_gain:  # a baseline at 0 (Hit@5 often is) has no relative gain: "–"
            gain = g.gain_over(base, metric, skip)
            row.append("–" if gain is None else f"{gain:+.2f}%")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _stage_list(stages: set[int]) -> str:
    return ", ".join(f"D{s}" for s in sorted(stages))


def _gain_notes(
    g: MethodRuns, base: MethodRuns, metric: str, skip: int | None, averaged: set[int]
) -> list[str]:
    """What the `vs` cell compares where it is not both rows' means over the table's stages (`gain_basis`):
    fewer stages (the row's or the baseline's stopped early, or lack the metric), or the seeds both
    finished."""
    stages, seeds = g.gain_basis(base, metric, skip)
    notes = []
    if stages and stages != averaged:
        notes.append(f"vs on {_stage_list(stages)}")
    mine, theirs = set(g.seed_means(metric, skip)), set(base.seed_means(metric, skip, stages))
    if seeds and not mine == theirs == set(seeds):
        notes.append(f"vs on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, both finished")
    elif not seeds and mine and theirs:
        notes.append("vs unpaired: no finished seed in common")
    return notes


def _fewer(vals: list[float], seeds: int) -> str:
    """The note for a cell that holds k values in a row of more seeds (one unfinished, or undefined there):
    " (n=k)"."""
    return f" (n={len(vals)})" if 0 < len(vals) < seeds else ""


def evaluated_stages(groups: list[MethodRuns]) -> list[int]:
    return sorted({s["eval_stage"] for g in groups for r in g.runs for s in r["stages"]})


def undefined_stages(groups: list[MethodRuns], metric: str) -> list[int]:
    """Evaluated stages where no run has a value of `metric`."""
    defined = {t for g in groups for t in g.stage_values(metric)}
    return [t for t in evaluated_stages(groups) if t not in defined]


def reference_line(groups: list[MethodRuns], metric: str) -> str:
    """A reference figure of the evaluation set (e.g. `log_items`, the nll of a uniform guess) per stage: one
    line for the methods that record it, one per group of methods where the values differ (candidate sets
    differ, or a run is unfinished)."""
    per_method = {}
    for g in groups:
        vals = g.stage_values(metric)
        if vals:
            per_method[g.method] = ", ".join(f"D{s} {np.mean(v):.4f}" for s, v in sorted(vals.items()))
    by_line: dict[str, list[str]] = defaultdict(list)
    for method, line in per_method.items():
        by_line[line].append(method)
    head = f"\n{metric.upper()} (a reference of the evaluated rows, not a score: never compared)"
    if len(by_line) == 1:
        line, methods = next(iter(by_line.items()))
        return f"{head}: {line} ({', '.join(methods)})."
    return head + ":\n\n" + "\n".join(f"- {', '.join(ms)}: {line}" for line, ms in by_line.items())


def kind_table(groups: list[MethodRuns], metric: str, skip: int | None = None) -> str | None:
    kinds = [k for k in ("active", "dormant", "new") if any(k in g.kind_values(metric, skip) for g in groups)]
    if not kinds:
        return None
    head = ["method", *[f"{k} users" for k in kinds]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    every = {s for g in groups for s in g.averaged_stages(skip)}
    for g in groups:
        kv = g.kind_values(metric, skip)
        mine = g.averaged_stages(skip)  # (its finished seeds have every one of them)
        name = g.method + (
            "" if mine == every else " (" + ", ".join(f"D{s}" for s in sorted(mine)) + " only)"
        )
        lines.append("| " + " | ".join([name, *[_fmt(kv.get(k, [])) for k in kinds]]) + " |")
    return "\n".join(lines)


def stage_sizes(groups: list[MethodRuns]) -> str:
    """Evaluated samples per stage (from the run with the most stages: a table may hold unfinished runs), so
    readers know how noisy each column is."""
    r = max((run for g in groups for run in g.runs), key=lambda run: len(run["stages"]))
    parts = []
    for s in r["stages"]:
        n = f"{s['n_eval']}"
        if s.get("eval_subsampled"):
            n += f" of {s['n_eval_total']}"
        parts.append(f"D{s['eval_stage']}: {n}")
    return ", ".join(parts)
