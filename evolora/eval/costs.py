"""The cost table of a report: where each method's time went, from the runs' recorded cost profiles.

Reads `results.json` only (`summary.cost` and the set-up cost in the header, written by `continual/loop.py`
and `experiment.py` through `cost.py`). Seconds are wall-clock seconds of the process that ran the work.
"""

from __future__ import annotations

from typing import Any

from evolora.cost import PARTS, add

#: parts always shown, whatever the runs recorded
SHOWN = ("training", "validation", "evaluation")


def _setup_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """One set-up per experiment folder and process: runs of one process share the model it loaded."""
    return (run.get("experiment"), run.get("context_key"), run.get("worker"))


def cost_table(groups: list[Any]) -> str | None:
    """Mean seconds per run, by part, for each method (`MethodRuns` groups); None if no run has a profile."""
    rows = []
    used: set[str] = set()
    for g in groups:
        profiled = [r for r in g.runs if "cost" in r.get("summary", {})]
        if not profiled:
            rows.append((g.method, len(g.runs), None))
            continue
        total = add([r["summary"]["cost"] for r in profiled])
        used |= {k for k, p in total["parts"].items() if p["seconds"] > 0}
        rows.append((g.method, len(profiled), total))
    if all(t is None for _, _, t in rows):
        return None
    parts = [p for p in PARTS if p in SHOWN or p in used]
    head = ["method", "runs", "total s", *[f"{p} s" for p in parts], "other s", "tokens (k)", "backward (k)"]
    head.append("saved s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, n, total in rows:
        if total is None:
            lines.append(f"| {method} | {n} | " + " | ".join(["n/a"] * (len(head) - 2)) + " |")
            continue
        per = total["parts"]

        def mean(x: float, n: int = n) -> str:
            return f"{x / n:.1f}"

        cells = [mean(total["total_seconds"])]
        cells += [mean(per.get(p, {}).get("seconds", 0.0)) for p in parts]
        cells.append(mean(per.get("other", {}).get("seconds", 0.0)))
        cells.append(mean(sum(p["tokens"] for p in per.values()) / 1000))
        cells.append(mean(sum(p["backward_tokens"] for p in per.values()) / 1000))
        cells.append(mean(total["saved_seconds"]))
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_time(groups: list[Any]) -> tuple[float, float]:
    """(seconds the runs' stages took, seconds of set-up: loading, item embeddings, RQ-VAE) over all runs."""
    runs = [r for g in groups for r in g.runs]
    stages = sum(r.get("summary", {}).get("cost", {}).get("total_seconds", 0.0) for r in runs)
    setups = {_setup_key(r): r.get("setup_cost", {}).get("total_seconds", 0.0) for r in runs}
    return stages, sum(setups.values())
