"""The report's plots: a metric per evaluated stage, one line per method, and (for runs with the
stage-by-stage matrix) one heatmap per method (`matrix_report.plot_matrices`).

With many methods, colours repeat after ten; each round of ten then gets its own line style and every method
its own marker, and the legend goes beside the axes, so 14+ lines stay apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evolora.eval.matrix_report import plot_matrices
from evolora.io import atomic_write_png

if TYPE_CHECKING:
    from evolora.eval.summary import MethodRuns


def write_plots(groups: list[MethodRuns], metric: str, folder: Path) -> list[Path]:
    """`<metric>.png` (the metric per stage) and, for runs with a matrix, `<metric>-matrix.png`."""
    written = [folder / f"{metric}.png"]
    plot_metric(groups, metric, written[0])
    if plot_matrices(groups, metric, folder / f"{metric}-matrix.png"):
        written.append(folder / f"{metric}-matrix.png")
    return written


def earlier_plots(folder: Path, metric: str) -> set[str]:
    """The plots of `metric` an earlier report in `folder` wrote, as its report.json lists them (none before
    the list was kept, 2026-12-06): a new report of the metric removes those it does not write again, or a
    matrix of the earlier runs would stand beside a report without one (another metric's plots stay: a
    folder may collect several)."""
    try:
        listed = json.loads((folder / "report.json").read_text()).get("plots", [])
    except (OSError, ValueError, AttributeError):
        return set()
    # names alone, and only this metric's plots: nothing else is removed whatever the file holds
    mine = {f"{metric}.png", f"{metric}-matrix.png"}
    return {n for n in listed if n in mine} if isinstance(listed, list) else set()


def line_style(i: int, n_colours: int = 10) -> tuple[int, str, str]:
    """The i-th method's (colour index, line style, marker): past `n_colours` methods colours repeat, so the
    line style changes with each round of them and the marker with each method."""
    round_ = i // n_colours
    return i % n_colours, ("-", "--", ":", "-.")[round_ % 4], ("o", "s", "^", "D", "v", "P")[(i + round_) % 6]


def plot_metric(groups: list[MethodRuns], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=120)
    colours = plt.get_cmap("tab10").colors
    hollow = False
    for i, g in enumerate(groups):
        vals = g.stage_values(metric)
        stages = sorted(vals)
        means = [np.mean(vals[s]) for s in stages]
        c, style, marker = line_style(i, len(colours))
        colour = colours[c]
        ax.plot(stages, means, marker=marker, linestyle=style, color=colour, label=g.method)
        if any(len(vals[s]) > 1 for s in stages):
            sd = [np.std(vals[s]) for s in stages]
            ax.fill_between(stages, np.subtract(means, sd), np.add(means, sd), color=colour, alpha=0.12)
        # A point of fewer seeds than the method ran (one unfinished) is not the others' kind of mean.
        fewer = [(s, m) for s, m in zip(stages, means, strict=True) if len(vals[s]) < len(g.runs)]
        if fewer:
            xs, ys = zip(*fewer, strict=True)
            ax.plot(xs, ys, marker=marker, linestyle="none", color=colour, markerfacecolor="white")
            hollow = True
    ax.set_xlabel("evaluated stage")
    ax.set_ylabel(metric.upper())
    ax.set_xticks(sorted({s for g in groups for s in g.stage_values(metric)}))
    ax.grid(alpha=0.3)
    # Many methods: the legend goes beside the axes, in two columns past 12.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if len(groups) > 12 else 1)
    ax.set_title(f"{metric.upper()} per stage")
    if hollow:
        fig.text(0.01, 0.005, "hollow marker: a mean of fewer seeds than the method ran", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_png(fig, path, bbox_inches="tight")
    plt.close(fig)
