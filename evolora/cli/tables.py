"""The tables `evolora run` prints when it ends: methods x evaluated stages (`stage_table`), what its mean
covers and the precision (`stage_table_note`), and the stage-by-stage matrix's summaries
(`matrix_summary_table`). They read the runs' results as `results.json` holds them (an undefined figure
is None there, NaN in memory: both print as '–')."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def stage_table(results: list[dict[str, Any]], metric_names: tuple[str, ...]) -> Table:
    """Methods x evaluated stages: the table `evolora run` prints at the end (`stage_table_note` says what
    its mean covers and the precision). When every method shares the first evaluated stage (one stage-1
    adapter), `mean` leaves it out."""
    from evolora.eval.report import shared_first_stage

    stages = sorted({s["eval_stage"] for r in results for s in r["stages"]})
    skip = shared_first_stage(results)
    table = Table(title="per-stage results (trained on stage t-1 or t, evaluated on the stage shown)")
    table.add_column("method")
    table.add_column("seed", justify="right")
    table.add_column("metric")
    for s in stages:
        table.add_column(f"D{s}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("train s", justify="right")
    for r in results:
        by_stage = {s["eval_stage"]: s for s in r["stages"]}
        for i, m in enumerate(metric_names):
            values = [by_stage.get(s, {}).get("metrics", {}).get(m) for s in stages]
            cells = [f"{v:.4f}" if v is not None and v == v else "–" for v in values]  # v == v: not NaN
            kept = [by_stage[t]["metrics"].get(m) for t in stages if t != skip and t in by_stage]
            kept = [v for v in kept if v is not None and v == v]  # v == v: not NaN
            mean = sum(kept) / len(kept) if kept else None
            secs = f"{r['summary'].get('train_seconds', 0):.0f}" if i == 0 else ""
            table.add_row(
                r["method"] if i == 0 else "",
                str(r["seed"]) if i == 0 else "",
                m,
                *cells,
                f"{mean:.4f}" if mean is not None else "–",
                secs,
            )
    return table


def matrix_summary_table(results: list[dict[str, Any]], metric: str) -> Table | None:
    """Runs with the stage-by-stage matrix (`eval.stages: seen | all`): its summaries of `metric`."""
    from evolora.eval.forgetting import SIGNED, SUMMARIES

    rows = [
        (r, r["summary"]["matrix"]["metrics"].get(metric, {})) for r in results if "matrix" in r["summary"]
    ]
    if not rows:
        return None
    table = Table(title=f"{metric} over the stage-by-stage matrix (definitions: evolora/eval/forgetting.py)")
    for name in ("method", "seed", *SUMMARIES):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r, values in rows:
        fmt = {k: "{:+.4f}" if k in SIGNED else "{:.4f}" for k in SUMMARIES}
        cells = [fmt[k].format(values[k]) if values.get(k) is not None else "–" for k in SUMMARIES]
        table.add_row(r["method"], str(r["seed"]), *cells)
    return table


def stage_table_note(results: list[dict[str, Any]]) -> str:
    from evolora.eval.report import diverged_jobs, precision_line, shared_first_stage

    skip = shared_first_stage(results)
    over = "every evaluated stage" if skip is None else f"D{skip} left out: shared within each experiment"
    note = f"precision: {precision_line(results)}; mean: {over}"
    lost = diverged_jobs(results)
    if lost:
        note += (
            f"\ndiverged (the loss was not finite in every epoch, so the weights each job started from were "
            f"kept and its figures are not those of a trained stage; lower train.lr): {', '.join(lost)}"
        )
    return note
