"""Compare runs: markdown tables of methods x stages (the plots are in `eval/plots.py`).

Input is any set of run folders; every `results.json` below them is read. Runs of the same method (label) on
the same dataset and task with different seeds are averaged, and the table says how many seeds went in
(± is the standard deviation across seeds). A method's mean over stages, its `vs` gain and its bootstrap
difference are over the seeds that evaluated every stage any of its seeds did (one still running would be
averaged over fewer stages: it is named, and its stages are in the per-stage cells), and a cell that holds
fewer seeds than its row says how many (n=k). Runs on other data or of another task, and
two runs of one method with one seed, are refused (`eval/runs.py`): no table can put them side by side.

When the methods of each experiment score the same on the first evaluated stage (they all evaluate one
shared stage-1 adapter, or one conventional model's stage-1 weights), that stage cannot tell them apart:
means, "vs finetune" percentages and bootstrap differences are then taken over the later stages for every
row, and the report says so; otherwise they cover every evaluated stage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolora.errors import EvoloraError
from evolora.eval.bootstrap import BASELINE, bootstrap_differences, difference_table
from evolora.eval.costs import cost_table, time_taken
from evolora.eval.matrix_report import matrix_section
from evolora.eval.metric_tables import (
    evaluated_stages,
    kind_table,
    metric_table,
    reference_line,
    stage_sizes,
    undefined_stages,
)
from evolora.eval.metrics import diverged, is_reference, lower_is_better, metric_set
from evolora.eval.runs import (
    check_comparable,
    find_results,
    not_started,
    ranking_notes,
    started_without_results,
)
from evolora.eval.summary import MethodRuns, report_data
from evolora.io import finite_json

DRAWS = 1000  # bootstrap draws of the report's difference table


def shared_first_stage(results: list[dict[str, Any]]) -> int | None:
    """The first evaluated stage when it cannot tell the compared methods apart: every seed of an
    experiment (runs with one `context_key`: same data, model and training) that scored two or more methods
    scores them the same there (one shared stage-1 adapter), and at least one seed did. An experiment with
    one method (a conventional model's run beside LLM strategies) does not stop it: its rows are then
    averaged over the same later stages as the others. Else None."""
    if len({r["method"] for r in results}) < 2 or any(not r["stages"] for r in results):
        return None
    first = {r["stages"][0]["eval_stage"] for r in results}
    if len(first) != 1:
        return None
    # figures and methods of each (experiment, seed): only a seed that scored two methods or more shows that
    # they share the stage (two experiments of one setting, each of one method, have one context_key)
    figures: dict[tuple[Any, Any], set[str]] = defaultdict(set)
    methods: dict[tuple[Any, Any], set[str]] = defaultdict(set)
    for r in results:
        at = (r.get("context_key"), r["seed"])
        # finite_json: an undefined figure is NaN in memory and in older files, null in newer ones
        figures[at].add(json.dumps(finite_json(r["stages"][0]["metrics"]), sort_keys=True))
        methods[at].add(r["method"])
    compared = [at for at, m in methods.items() if len(m) >= 2]
    if not compared:
        return None
    return first.pop() if all(len(figures[at]) == 1 for at in compared) else None


def precision_line(results: list[dict[str, Any]]) -> str:
    """Which precision the runs used (recorded in each results.json)."""
    by_precision: dict[str, list[str]] = defaultdict(list)
    for r in results:
        p = r.get("precision", "unrecorded")
        if r["method"] not in by_precision[p]:
            by_precision[p].append(r["method"])
    if len(by_precision) == 1:
        return f"{next(iter(by_precision))} (every run)"
    return "; ".join(f"{p}: {', '.join(m)}" for p, m in by_precision.items())


def machine_line(results: list[dict[str, Any]]) -> str | None:
    """Which machines computed the runs' stages (recorded per stage: a resumed run may change machine);
    None when no run recorded one."""
    stages: dict[str, int] = defaultdict(int)
    for r in results:
        for s in r.get("stages", []):
            if "machine" in s:
                stages[s["machine"]] += 1
    if not stages:
        return None
    if len(stages) == 1:
        return f"Machine: {next(iter(stages))} (every recorded stage)."
    listed = "; ".join(f"{m}: {n} stage{'s' if n > 1 else ''}" for m, n in sorted(stages.items()))
    return (
        f"Machines: {listed}. The same fp32 run rounds differently on CPUs with other vector extensions, so "
        "cells computed on different machines can differ slightly beyond what the seeds explain."
    )


def group_runs(results: list[dict[str, Any]]) -> list[MethodRuns]:
    groups: dict[tuple[str, str, str], MethodRuns] = {}
    for r in results:
        key = (r["method"], r.get("dataset", "?"), r.get("task", "?"))
        groups.setdefault(key, MethodRuns(*key)).runs.append(r)
    return list(groups.values())


@dataclass
class Report:
    text: str  # report.md
    groups: list[MethodRuns]  # the runs read, by method
    data: dict[str, Any]  # report.json (`eval/summary.py`)
    lead: str  # the metric of the bootstrap and the plots: the first asked for that scores (not a
    # reference) and is defined on some stage


def build_report(
    paths: list[Path], metrics: list[str] | None = None, baseline: str | None = None
) -> tuple[str, list[MethodRuns]]:
    """The report's markdown and the method groups it read (`compose_report`, without report.json)."""
    report = compose_report(paths, metrics, baseline)
    return report.text, report.groups


def compose_report(
    paths: list[Path],
    metrics: list[str] | None = None,
    baseline: str | None = None,
    options: tuple[str, str] = ("--metric ", "--baseline "),
) -> Report:
    """The report of the runs under `paths`, as markdown and as data. `baseline` is the method every
    difference is taken against; left out, it is `finetune` where the runs have one (and no differences
    otherwise). Naming a method that is not among the runs, `finetune` included, is an error. `options`:
    how errors name the metric and baseline settings (the CLI's flags, or the Python API's arguments)."""
    results = find_results(paths)
    empty = [r for r in results if not r["stages"]]
    if empty:
        r = empty[0]
        raise EvoloraError(
            f"{r['method']} (seed {r['seed']}) has no evaluated stage: a next_stage run needs at least 2 "
            f"stages{'' if len(empty) == 1 else f' ({len(empty)} runs like it)'}; rerun it with more stages"
        )
    check_comparable(results)
    groups = group_runs(results)
    methods = [g.method for g in groups]
    if baseline is not None and baseline not in methods:
        raise EvoloraError(
            f"{options[1]}{baseline}: no such method in these runs; they have {', '.join(methods)}"
        )
    baseline = baseline or BASELINE
    tasks = {g.task for g in groups}
    recorded = {m for r in results for s in r["stages"] for m in s["metrics"]}
    if metrics is None:  # what the tasks show first, then the rest they record
        sets = [metric_set(t) for t in sorted(tasks)]
        ordered = [m for ms in sets for m in ms.shown] + [m for ms in sets for m in ms.names]
        metrics = [m for m in dict.fromkeys(ordered) if m in recorded]
    metrics = list(dict.fromkeys(metrics))  # a metric asked for twice is one table
    unknown = [m for m in metrics if m not in recorded]
    if unknown:
        raise EvoloraError(
            f"{options[0]}{', '.join(unknown)}: not recorded by these runs; "
            f"they have {', '.join(sorted(recorded))}"
        )
    skip = shared_first_stage(results)
    out = []
    datasets = sorted({g.dataset for g in groups})
    out.append(f"Dataset: {', '.join(datasets)}; task: {', '.join(sorted(tasks))}.")
    out.append(f"Evaluated samples per stage: {stage_sizes(groups)}.")
    out.append(f"Precision: {precision_line(results)}.")
    if any(len({r["seed"] for r in g.runs}) > 1 for g in groups):
        out.append(
            "A cell of several seeds is their mean ± their standard deviation (the population one, ddof=0: "
            "with 3 seeds 0.82 of the sample one)."
        )
    machines = machine_line(results)
    if machines:
        out.append(machines)
    lost = diverged_jobs(results)
    if lost:
        out.append(
            "**Diverged training** (the loss was not finite in every epoch: the weights the job started from "
            f"were kept, so these figures are not those of a trained stage): {', '.join(lost)}."
        )
    covered = f"means, `vs {baseline}` and bootstrap differences" if baseline in methods else "means"
    nothing_left = skip is not None and evaluated_stages(groups) == [skip]
    if nothing_left:
        out.append(
            f"The methods score the same on D{skip} (one shared stage-1 model), the only evaluated stage: "
            "nothing tells them apart, so there are no means or differences (run more stages)."
        )
    elif skip is not None:
        out.append(
            f"The methods of each experiment score the same on D{skip} (one shared stage-1 model): "
            f"{covered} leave D{skip} out."
        )
    else:
        out.append(f"{covered[0].upper()}{covered[1:]} cover every evaluated stage.")
    out.extend(ranking_notes(results))
    incomplete = [g.method for g in groups if not all(r.get("complete") for r in g.runs)]
    if incomplete:
        out.append(f"Incomplete runs (not all stages finished): {', '.join(incomplete)}.")
    waiting = started_without_results(paths)
    if waiting:
        listed = ", ".join(f"{d.parent.name} {d.name}" for d in waiting)
        out.append(f"Started, no stage recorded yet (not in the tables until one is): {listed}.")
    unstarted = not_started(results)
    if unstarted:
        out.append(
            f"Not started yet (in the experiment's config, not in the tables): {'; '.join(unstarted)}."
        )
    behind = [f"{g.method} {seed}" for g in groups for seed in g.unfinished_seeds()]
    if behind:
        out.append(
            "Seeds behind their method's others, left out of its means and differences until they catch up "
            f"(their stages are in the per-stage cells): {', '.join(behind)}."
        )
    for m in metrics:
        if is_reference(m):
            out.append(reference_line(groups, m))
            continue
        arrow = "lower is better" if lower_is_better(m) else "higher is better"
        out.append(f"\n### {m.upper()} per evaluated stage ({arrow})\n")
        out.append(metric_table(groups, m, skip, baseline))
        undefined = undefined_stages(groups, m)
        if undefined:
            listed = ", ".join(f"D{t}" for t in undefined)
            out.append(
                f"\n{m.upper()} is undefined on {listed} for every method (its samples share one label, or "
                "none was evaluated): the means leave it out."
            )
    # The bootstrap, the user-kind table and the plots follow the first metric that scores the models (a
    # reference figure asked for first is the same for every method) and is defined on some stage (AUC on
    # rows of one label is not: its interval and plot would be empty beside a defined LogLoss).
    scoring = [m for m in metrics if not is_reference(m)]
    defined = [m for m in scoring if any(g.stage_values(m) for g in groups)]
    lead = (defined or scoring or [None])[0]
    plotted = lead or metrics[0]
    differences = (
        None
        if lead is None or nothing_left
        else bootstrap_differences(groups, lead, baseline=baseline, draws=DRAWS, skip=skip)
    )
    if differences is not None:
        out.append(f"\n### Paired bootstrap: {lead.upper()} difference to {baseline} ({DRAWS} draws)\n")
        out.append(
            "All methods are scored on the same evaluation rows; rows are resampled jointly within each "
            "stage (one resample shared by every method and seed), so the interval reflects which rows "
            "(users' interactions) happened to be evaluated, and with several seeds the seeds are resampled "
            "too (training noise). `decided`: the 95% interval excludes 0.\n"
        )
        out.append(difference_table(differences, lead, baseline))
    kt = kind_table(groups, lead, skip) if lead is not None else None
    if kt:
        over = "stages" if skip is None else f"stages but D{skip}"
        out.append(f"\n### {lead.upper()} by user kind (mean over {over})\n")
        out.append(
            "active: also seen in the previous stage; dormant: seen before but not in the previous stage; "
            "new: first seen in this stage.\n"
        )
        out.append(kt)
    out.extend(matrix_section(groups, metrics, plotted, baseline))
    times = ", ".join(f"{g.method} {g.train_seconds():.0f}s" for g in groups)
    out.append(f"\nTraining time per run (sum over stages, shared results counted in full): {times}.")
    costs = cost_table(groups)
    if costs:
        out.append("\n### Where the time went (seconds per run, mean over seeds)\n")
        out.append(
            "Wall-clock seconds of each part of the stages (`other`: metrics, restoring adapters, strategy "
            "set-up), and `CPU s`, the CPU time of the whole stages (every thread; unchanged by load or "
            "pauses, `n/a` for runs recorded before it was kept); tokens read by the LLM's forward passes "
            "and the share a backward pass followed; "
            "`saved`: what reused results (a shared stage-1 job, stored predictions) took when computed.\n"
        )
        out.append(costs)
        out.append(f"\n{time_taken(groups)}")
    data = report_data(groups, metrics, baseline, skip, differences, DRAWS, lead)
    return Report("\n".join(out) + "\n", groups, data, plotted)


def diverged_jobs(results: list[dict[str, Any]]) -> list[str]:
    """The training jobs of `results` whose every epoch ended with a non-finite training loss, per method (a
    job shared by several methods or jobs counts for each, and says so where it was reused)."""
    lost = []
    for r in results:
        for s in r["stages"]:
            for job in s.get("jobs", []):
                if diverged(job.get("history", [])):
                    shared = ", trained once and shared" if job.get("reused_shared_result") else ""
                    lost.append(
                        f"{r['method']} seed {r['seed']} stage {s['train_stage']} ({job['job']}{shared})"
                    )
    return lost
