"""The cost table of a report: where each method's time went, from the runs' recorded cost profiles.

Reads `results.json` only (`summary.cost` and the set-up cost in the header, written by `continual/loop.py`
and `experiment.py` through `cost.py`). Seconds are wall-clock seconds of the process that ran the work;
CPU seconds are that process's CPU time (every thread), which load on the other cores and pauses do not
change. Runs recorded before CPU time was kept show `n/a` there (before 2026-12-05 for the time reuse
saved), and the total then falls back to wall-clock time, saying so.
"""

from __future__ import annotations

from typing import Any

from evolora.cost import PARTS, add, setups_of

#: parts always shown, whatever the runs recorded
SHOWN = ("training", "validation", "evaluation")


def cost_table(groups: list[Any]) -> str | None:
    """Mean seconds per run, by part, for each method (`MethodRuns` groups); None if no run has a profile."""
    rows = []
    used: set[str] = set()
    for g in groups:
        # per finished run: a seed still running has spent less (`MethodRuns.finished_runs`)
        profiled = _profiled(g)
        if not profiled:
            rows.append((g.method, len(g.finished_runs()), None))
            continue
        total = add([r["summary"]["cost"] for r in profiled])
        used |= {k for k, p in total["parts"].items() if p["seconds"] > 0}
        rows.append((g.method, len(profiled), total))
    if all(t is None for _, _, t in rows):
        return None
    parts = [p for p in PARTS if p in SHOWN or p in used]
    head = ["method", "runs", "total s", "CPU s", *[f"{p} s" for p in parts]]
    head += ["other s", "tokens (k)", "backward (k)", "saved s", "saved CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, n, total in rows:
        if total is None:
            lines.append(f"| {method} | {n} | " + " | ".join(["n/a"] * (len(head) - 2)) + " |")
            continue
        per = total["parts"]

        def mean(x: float, n: int = n) -> str:
            return f"{x / n:.1f}"

        cells = [mean(total["total_seconds"])]
        cells.append(mean(total["total_cpu_seconds"]) if "total_cpu_seconds" in total else "n/a")
        cells += [mean(per.get(p, {}).get("seconds", 0.0)) for p in parts]
        cells.append(mean(per.get("other", {}).get("seconds", 0.0)))
        cells.append(mean(sum(p["tokens"] for p in per.values()) / 1000))
        cells.append(mean(sum(p["backward_tokens"] for p in per.values()) / 1000))
        cells.append(mean(total["saved_seconds"]))
        cells.append(mean(total["saved_cpu_seconds"]) if "saved_cpu_seconds" in total else "n/a")
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_time(groups: list[Any]) -> tuple[float, float, bool]:
    """(seconds the runs' stages took, seconds of set-up: loading, item embeddings, RQ-VAE, and whether
    those are CPU seconds) over all runs: CPU time where every run recorded it, else wall-clock time."""
    runs = [r for g in groups for r in g.runs]
    costs = [r.get("summary", {}).get("cost", {}) for r in runs]
    setup_costs: dict[str, Any] = {}
    for r in runs:  # every sitting's, once: the runs of one process share the model it loaded
        setup_costs.update(setups_of(r))
    on_cpu = all("total_cpu_seconds" in c for c in [*costs, *setup_costs.values()] if c)
    key = "total_cpu_seconds" if on_cpu else "total_seconds"
    stages = sum(c.get(key, 0.0) for c in costs)
    return stages, sum(c.get(key, 0.0) for c in setup_costs.values()), on_cpu


def time_taken(groups: list[Any]) -> str | None:
    """The sentence report.md ends its cost section with, and `evolora run` its output: what the runs took in
    all (CPU time where every run recorded it), in stages and setting up; None if no run has a profile."""
    if not any(_profiled(g) for g in groups):  # (as `cost_table` has no rows)
        return None
    stages, setup, on_cpu = cpu_time(groups)
    return (
        f"{'CPU time' if on_cpu else 'Wall-clock time'} these runs took: {_duration(stages + setup)} "
        f"({_duration(stages)} in stages, {_duration(setup)} setting up: data, models, item embeddings)"
        + ("." if on_cpu else "; some runs were recorded before CPU time was kept.")
    )


def _profiled(group: Any) -> list[dict[str, Any]]:
    """A method's finished runs that recorded where their time went."""
    return [r for r in group.finished_runs() if "cost" in r.get("summary", {})]


def _duration(seconds: float) -> str:
    # seconds under a minute: tenths of a minute made a total of 0.1 min from parts of 0.0 min
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
