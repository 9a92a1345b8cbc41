"""The stage-by-stage matrix in `evolora report`: a summary table per metric and a heatmap per method.

Runs recorded with `eval.stages: seen | all` carry R[t][j] in each stage record (`matrix`); the summaries
(average, BWT, forgetting, FWT, plasticity) are computed per run by `forgetting.summaries` and shown as the
mean over seeds, ± the standard deviation across seeds where there are several, with a 95% bootstrap
interval over the evaluated rows: each draw resamples the rows of every stage j once and scores every entry
of column j (every t, every method, every seed) on that resample, so entries and methods stay paired, and
recomputes the summaries (the seeds' mean); with several seeds each draw also resamples the seeds, so the
interval covers training noise as well. The same draws (rows and seeds) give each method's difference to
the baseline (finetune) seed by seed, so those intervals are paired: what the two share (the stage-1
adapter, the rows that happened to be drawn) cancels.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evolora.eval.bootstrap import BASELINE
from evolora.eval.forgetting import SIGNED, SUMMARIES, matrix_of, summaries
from evolora.eval.metrics import is_reference, lower_is_better, metric_set
from evolora.eval.stored import stored_predictions
from evolora.io import atomic_write_png
from evolora.progress import task as progress_task


class _Runs(Protocol):  # report.MethodRuns, without importing the report
    method: str
    task: str
    runs: list[dict[str, Any]]


def run_matrix(run: dict[str, Any], metric: str) -> dict[int, dict[int, float]]:
    """R[t][j] of one run and metric ({} for a run recorded without a matrix)."""
    rows = {s["train_stage"]: s["matrix"] for s in run["stages"] if "matrix" in s}
    return matrix_of(rows, metric)


def has_matrix(groups: list[Any]) -> bool:
    return any("matrix" in s for g in groups for r in g.runs for s in r["stages"])


def _cell(values: list[float | None], signed: bool, interval: tuple[float, float] | None) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    out = fmt.format(np.mean(vals))
    if len(vals) > 1:
        out += f" ± {np.std(vals):.4f} (n={len(vals)})"
    if interval is not None and all(math.isfinite(x) for x in interval):
        out += " [" + ", ".join(fmt.format(x) for x in interval) + "]"
    return out


class _Draws:
    """The summaries of every run on each bootstrap draw (module docstring): `values[method][seed]` is an
    array [draws, summaries] (NaN where a summary is undefined), `chosen[d]` the seeds draw d averages
    (the same for every method, so differences between methods are paired in seeds as well as rows)."""

    def __init__(self, groups: list[_Runs], metric: str, draws: int, seed: int) -> None:
        higher = not lower_is_better(metric)
        runs = {
            g.method: {r["seed"]: a for r in g.runs if (a := stored_predictions(r, matrix=True))}
            for g in groups
        }
        self.runs = {m: v for m, v in runs.items() if v}
        self.values: dict[str, dict[Any, np.ndarray]] = {}
        if not self.runs:
            return
        on_arrays = metric_set(next(g.task for g in groups if g.method in self.runs)).on_arrays
        sizes = {
            j: len(row[j]["rows"])
            for v in self.runs.values()
            for a in v.values()
            for row in a.values()
            for j in row
        }
        seeds = sorted({s for v in self.runs.values() for s in v})
        self.values = {
            m: {s: np.full((draws, len(SUMMARIES)), np.nan) for s in v} for m, v in self.runs.items()
        }
        self.chosen: list[list[Any]] = []
        rng = np.random.default_rng(seed)
        with progress_task(f"matrix bootstrap ({metric})", total=draws) as bar:
            for d in range(draws):
                idx = {j: rng.integers(0, n, n) for j, n in sorted(sizes.items())}
                picks = rng.integers(0, len(seeds), len(seeds)) if len(seeds) > 1 else [0]
                self.chosen.append([seeds[i] for i in picks])
                for method, by_seed in self.runs.items():
                    for s, a in by_seed.items():
                        x = summaries(
                            {t: {j: on_arrays(a[t][j], idx[j], metric) for j in a[t]} for t in a}, higher
                        )
                        self.values[method][s][d] = [np.nan if x[k] is None else x[k] for k in SUMMARIES]
                bar.advance()

    def _over_draws(self, by_seed: dict[Any, np.ndarray]) -> dict[str, tuple[float, float]]:
        """The 95% interval of each summary of per-seed values [draws, summaries]: on draw d the mean over
        the seeds drawn that `by_seed` has (NaN where it has none, or a summary is undefined on all)."""
        if not by_seed:
            return {}
        per_draw = []
        for d, drawn in enumerate(self.chosen):
            rows = [by_seed[s][d] for s in drawn if s in by_seed]
            if not rows:
                per_draw.append(np.full(len(SUMMARIES), np.nan))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # undefined on every seed: stays NaN
                per_draw.append(np.nanmean(rows, axis=0))
        stacked = np.array(per_draw)  # [draws, summaries]
        return {
            k: tuple(np.nanpercentile(stacked[:, i], [2.5, 97.5]))
            for i, k in enumerate(SUMMARIES)
            if np.isfinite(stacked[:, i]).any()
        }

    def interval(self, method: str, seeds: set[Any] | None = None) -> dict[str, tuple[float, float]]:
        """A 95% interval of each summary of `method` (the mean over the drawn seeds it has, of `seeds`)."""
        mine = self.values.get(method, {})
        return self._over_draws({s: v for s, v in mine.items() if seeds is None or s in seeds})

    def difference(self, method: str, baseline: str, seeds: set[Any]) -> dict[str, tuple[float, float]]:
        """A 95% interval of each summary's difference method - baseline, seed by seed over `seeds`."""
        mine, theirs = self.values.get(method, {}), self.values.get(baseline, {})
        return self._over_draws({s: mine[s] - theirs[s] for s in set(mine) & set(theirs) & seeds})


def _per_seed(g: _Runs, metric: str) -> dict[Any, dict[str, float | None]]:
    higher = not lower_is_better(metric)
    return {r["seed"]: summaries(m, higher) for r in g.runs if (m := run_matrix(r, metric))}


def _last_trained(g: _Runs) -> dict[Any, int]:
    """Per seed, the last stage whose matrix row the run recorded (an unfinished run stops early)."""
    return {
        r["seed"]: max(rows)
        for r in g.runs
        if (rows := [s["train_stage"] for s in r["stages"] if "matrix" in s])
    }


def _furthest_stage(groups: list[_Runs]) -> int:
    """The last matrix row any run of the report recorded."""
    return max((t for g in groups for t in _last_trained(g).values()), default=0)


def _furthest(g: _Runs, most: int) -> set[Any]:
    """The seeds of `g` that recorded matrix row `most` (`_furthest_stage`): summaries of a seed that stopped
    earlier cover fewer stages (its `average` is over stages 1..t of its own t) and are not averaged with
    them, nor set beside other methods' rows."""
    return {s for s, t in _last_trained(g).items() if t == most}


def unfinished_matrix_seeds(groups: list[_Runs]) -> list[str]:
    """'method seed s (through stage t of T)' for each seed the summary table leaves out (`_furthest`)."""
    most = _furthest_stage(groups)
    return [
        f"{g.method} seed {s} (through stage {t} of {most})"
        for g in groups
        for s, t in _last_trained(g).items()
        if t < most
    ]


def summary_table(groups: list[_Runs], metric: str, boot: _Draws | None = None) -> str | None:
    """Methods x summaries of one metric, over the seeds that recorded a matrix up to the report's furthest
    stage (`_furthest`); intervals from `boot` (none without it)."""
    head = ["method", *SUMMARIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    most = _furthest_stage(groups)
    for g in groups:
        seeds = _furthest(g, most)
        per_run = [v for s, v in _per_seed(g, metric).items() if s in seeds]
        if per_run:
            intervals = boot.interval(g.method, seeds) if boot else {}
            cells = [_cell([s[k] for s in per_run], k in SIGNED, intervals.get(k)) for k in SUMMARIES]
            lines.append(f"| {g.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def difference_table(groups: list[_Runs], metric: str, boot: _Draws, baseline: str) -> str | None:
    """Each method's summaries minus the baseline's, seed by seed over the seeds both ran to the report's
    furthest stage (`_furthest`, as the summary table), with the paired 95% interval; bold where it excludes
    0 (decided)."""
    base = next((g for g in groups if g.method == baseline), None)
    if base is None:
        return None
    most = _furthest_stage(groups)
    theirs, their_seeds = _per_seed(base, metric), _furthest(base, most)
    head = ["method", "seeds", *(f"Δ{k}" for k in SUMMARIES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        mine = _per_seed(g, metric)
        # A seed one of the two has not finished waits: its summaries cover fewer stages, and the summary
        # table beside this one leaves it out (two seeds stopped at the same earlier stage were paired here).
        both = sorted(set(mine) & set(theirs) & _furthest(g, most) & their_seeds)
        if g.method == baseline or not both:
            continue
        intervals = boot.difference(g.method, baseline, set(both))
        cells = []
        for k in SUMMARIES:
            diffs = [
                mine[s][k] - theirs[s][k] for s in both if mine[s][k] is not None and theirs[s][k] is not None
            ]
            iv = intervals.get(k)
            if not diffs or iv is None:
                cells.append("–")
                continue
            point = f"{np.mean(diffs):+.4f}"
            decided = iv[0] > 0 or iv[1] < 0
            cells.append((f"**{point}**" if decided else point) + f" [{iv[0]:+.4f}, {iv[1]:+.4f}]")
        lines.append(f"| {g.method} | {len(both)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def matrix_section(groups: list[_Runs], metrics: list[str], lead: str, baseline: str = BASELINE) -> list[str]:
    """The report's section on the matrix (nothing when no run recorded one); `lead` is the plots' metric."""
    if not has_matrix(groups):
        return []
    out = [
        "\n### The stage-by-stage matrix: what each stage kept and gave\n\n"
        "R[t][j]: trained through stage t, tested on stage j's fixed rows (heatmaps: "
        f"`{lead}-matrix.png`). Definitions in `evolora/eval/forgetting.py`: average = the last "
        "model over the stages it learned; BWT = its change on each earlier stage since that stage was "
        "learned; forgetting = the drop from a stage's best; FWT = a stage not yet trained on, against "
        "the stage-1 model; plasticity = each stage right after learning it, D1 left out. BWT and FWT "
        "are signed so that > 0 is better and forgetting so that > 0 is worse, whichever way the metric "
        "goes; average and plasticity are the metric itself. Mean over seeds (± sd where several) and, "
        "in brackets, a 95% interval over 1000 resamples of the evaluated rows (the same for every "
        "method) and, with several seeds, of the seeds (`evolora/eval/matrix_report.py`). Then each "
        f"method against `{baseline}`: the difference of each summary, seed by seed over the seeds both "
        "ran to the last stage, with the interval of the same resamples taken jointly for both "
        "(paired in rows and seeds); **bold**: the interval excludes 0 (decided)."
    ]
    unfinished = unfinished_matrix_seeds(groups)
    if unfinished:
        out.append(
            "\nLeft out of the summaries until they finish (their summaries would cover fewer stages): "
            + ", ".join(unfinished)
            + "."
        )
    for m in (m for m in metrics if not is_reference(m)):
        boot = _Draws(groups, m, draws=1000, seed=0)
        table = summary_table(groups, m, boot)
        if table:
            out.append(f"\n{m.upper()}:\n\n{table}")
        diff = difference_table(groups, m, boot, baseline)
        if diff:
            out.append(f"\n{m.upper()}, difference to {baseline}:\n\n{diff}")
    return out


def heatmap_cells(groups: list[_Runs], metric: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Per method, each matrix cell's mean over the seeds that reached its last row (a seed still running
    would make its upper rows means of more seeds than its lower ones), and its plot title (which says so
    where seeds are left out)."""
    means, titles = {}, {}
    for g in groups:
        last = _last_trained(g)
        seeds = _furthest(g, max(last.values(), default=0))
        cells: dict[tuple[int, int], list[float]] = {}
        for r in g.runs:
            if r["seed"] not in seeds:
                continue
            for t, row in run_matrix(r, metric).items():
                for j, v in row.items():
                    if math.isfinite(v):
                        cells.setdefault((t, j), []).append(v)
        if cells:
            means[g.method] = {k: float(np.mean(v)) for k, v in cells.items()}
            behind = len(last) - len(seeds)
            titles[g.method] = g.method + (f" ({len(seeds)} of {len(last)} seeds)" if behind else "")
    return means, titles


def plot_matrices(groups: list[_Runs], metric: str, path: Path) -> bool:
    """One heatmap per method (`heatmap_cells`) on a common colour scale; False when no run has a
    matrix."""
    means, titles = heatmap_cells(groups, metric)
    if not means:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = sorted({t for m in means.values() for t, _ in m})
    js = sorted({j for m in means.values() for _, j in m})
    values = [v for m in means.values() for v in m.values()]
    lo, hi = min(values), max(values)
    cols = min(4, len(means))
    rows = math.ceil(len(means) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(2.6 * cols + 0.8, 2.3 * rows + 0.4),
        dpi=120,
        squeeze=False,
        layout="constrained",
    )
    cmap = "viridis_r" if lower_is_better(metric) else "viridis"
    image = None
    for ax, (method, m) in zip(axes.flat, means.items(), strict=False):
        grid = np.full((len(ts), len(js)), np.nan)
        for (t, j), v in m.items():
            grid[ts.index(t), js.index(j)] = v
        image = ax.imshow(grid, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
        for (a, b), v in np.ndenumerate(grid):
            if np.isfinite(v):
                light = (
                    (v - lo) / (hi - lo or 1.0) > 0.6
                    if cmap == "viridis"
                    else (v - lo) / (hi - lo or 1.0) < 0.4
                )
                ax.text(
                    b,
                    a,
                    f"{v:.3f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if light else "white",
                )
        ax.set_title(titles[method], fontsize=8)
        ax.set_xticks(range(len(js)), [f"D{j}" for j in js], fontsize=7)
        ax.set_yticks(range(len(ts)), [f"t={t}" for t in ts], fontsize=7)
    for ax in list(axes.flat)[len(means) :]:
        ax.axis("off")
    fig.suptitle(f"{metric.upper()}: trained through stage t (rows), tested on stage j (columns)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_png(fig, path)
    plt.close(fig)
    return True
