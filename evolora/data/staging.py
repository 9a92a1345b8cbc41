"""Cut a time-sorted interaction table into stages D1..DT.

Every scheme returns the interactions (in time order) with an extra `stage` column (Int32): 1..T for the
interactions of a stage, 0 for history-only interactions before the staged window.

Interactions that share a timestamp always land in the same stage: a cut that would split a group of equal
timestamps moves forward to the end of that group. So the last timestamp of stage t is strictly smaller than
the first timestamp of stage t+1, and a model never trains on data from the same instant it is tested on.
A stage left empty by that rule (or by too little data) is an error, not a silently shorter run.

Pre-blocked data (PESO's release, or a table with a stage column) brings its own stages; `scheme: preset`
uses them as they are. They must still follow one another in time (`InteractionData.validate`), but where
a stage ends is the data's choice (a release date, a catalogue change), and equal timestamps may straddle it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import polars as pl

from evolora.config import StagingConfig
from evolora.data.schema import check_preset_stages
from evolora.errors import DataError

log = logging.getLogger("evolora.data")


def stage_lsat(
    df: pl.DataFrame,
    n_stages: int,
    last_n: int | None = None,
    by: Literal["count", "time"] = "count",
    scheme: str = "lsat",
    window: tuple[int, int] | None = None,
) -> pl.DataFrame:
    """LSAT's periods (Shi et al., CIKM'24, arXiv 2312.15599): the last `last_n` interactions (all when None)
    form the window.

    `by="count"` cuts the window into `n_stages` periods of equal interaction count (their MovieLens-1M
    setup is 20 x 10,000 *samples*: they build samples first and cut those, so a period here holds a few
    percent fewer samples, those whose user lacks `min_history` earlier interactions); `by="time"` into
    `n_stages` bins of equal length in time, from the window's first interaction to its last (their
    Amazon-Book setup: 20 bins of ~76 days over a fixed calendar window, which `window` = (start, end) epoch
    seconds sets: the bins then span [start, end), and interactions at or after `end` are left out, counted
    in the log). Interactions before the window are stage 0 (history only).
    """
    df = _sorted(df)
    ts = df["timestamp"].to_numpy()
    n = len(ts)
    if window is not None:
        return _time_window(df, ts, n_stages, window, scheme)
    if last_n is not None and last_n > n:
        log.warning("staging.last_n=%d but there are only %d interactions: staging all of them", last_n, n)
    start = _tie_end(ts, n - min(last_n, n)) if last_n is not None else 0
    if start >= n:
        raise DataError(
            f"staging {scheme}: the last {last_n} interactions all share their timestamp with earlier ones, "
            "and interactions with one timestamp stay in one stage, so the window is empty; "
            "raise staging.last_n"
        )
    # `scheme` names the staging.scheme in messages: `single` is one LSAT period.
    label = f"{scheme} ({by}, {n_stages} stage{'s' if n_stages != 1 else ''})"
    if by == "count":
        return _from_bounds(df, ts, _equal_count(ts, start, n, n_stages), label)
    if by != "time":
        raise ValueError(f"unknown staging mode {by!r}")
    stage = np.zeros(n, dtype=np.int32)
    t0, span = int(ts[start]), int(ts[-1]) - int(ts[start]) + 1
    # Bin k covers [t0 + k*span/T, t0 + (k+1)*span/T); integer arithmetic keeps the bins exact.
    stage[start:] = (ts[start:] - t0) * n_stages // span + 1
    counts = np.bincount(stage, minlength=n_stages + 1)
    for t in range(1, n_stages + 1):
        if counts[t] == 0:
            lo, hi = t0 + -(-(t - 1) * span // n_stages), t0 + -(-t * span // n_stages)
            why = f"no interaction falls in its time span [{lo}, {hi})"
            raise DataError(
                f"staging {label}: stage {t} is empty: {why}. Use fewer stages (staging.n_stages) or "
                "staging.by=count"
            )
    return _finish(df, stage, n_stages, label)


def stage_peso(df: pl.DataFrame, n_stages: int = 5, base_fraction: float = 0.6) -> pl.DataFrame:
    """PESO's split (Yoo et al., ICLR'26, arXiv 2510.25093): the first `base_fraction` of interactions by time
    is D1, the rest is cut into `n_stages - 1` equal-count blocks (their T = 5, 60% base). PESO's release
    also keeps, per block, only users with at least 5 interactions in it (which is why its D1 holds ~70% of
    what remains); this does not: `format: peso` reads the release's own blocks."""
    if n_stages < 2:
        raise DataError(f"staging peso: n_stages must be at least 2, got {n_stages}")
    df = _sorted(df)
    ts = df["timestamp"].to_numpy()
    n = len(ts)
    base = _tie_end(ts, round(base_fraction * n))
    bounds = [0, *_equal_count(ts, base, n, n_stages - 1)]

    def advice(t: int) -> str:  # stage 1 is the base; the others share what it leaves
        return f"{'a larger' if t == 1 else 'a smaller'} staging.base_fraction"

    return _from_bounds(df, ts, bounds, f"peso ({base_fraction:g} base, {n_stages} stages)", advice)


def stage_global(df: pl.DataFrame, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> pl.DataFrame:
    """One cut by global timestamp in `ratios` (8:1:1 by default, the proportions of RecLoRA's split: Zhu et
    al., KDD'24, arXiv 2408.03533), giving stages 1..len(ratios). RecLoRA cuts its samples so and trains on
    the first part, validates on the second, tests on the third; this cuts interactions, and the parts are
    continual stages, so `protocol` decides what trains and what is tested."""
    if len(ratios) < 2 or any(r <= 0 for r in ratios):
        raise DataError(f"staging global: ratios must be at least two positive numbers, got {list(ratios)}")
    df = _sorted(df)
    ts = df["timestamp"].to_numpy()
    n = len(ts)
    total, acc, bounds = float(sum(ratios)), 0.0, [0]
    for r in ratios[:-1]:
        acc += r
        bounds.append(max(_tie_end(ts, round(n * acc / total)), bounds[-1]))
    bounds.append(n)
    label = f"global ({':'.join(f'{r:g}' for r in ratios)})"
    return _from_bounds(df, ts, bounds, label, lambda t: "a larger part of staging.ratios")


def stage_preset(df: pl.DataFrame, preset: np.ndarray, n_stages: int | None = None) -> pl.DataFrame:
    """The stages the dataset came with (`InteractionData.preset_stages`, row by row with `df`).

    `n_stages`, when given, must equal the number of preset stages: a config that expects another count is
    an error rather than a silently different run.
    """
    stage = np.asarray(preset)
    if stage.ndim != 1 or len(stage) != df.height:
        raise DataError(f"staging preset: {stage.size} preset stages for {df.height} interactions")
    if df.height == 0:
        raise DataError("staging: there are no interactions to stage")
    if not df["timestamp"].is_sorted():  # sort rows and stages together, so they stay aligned
        df = df.with_columns(_preset=pl.Series(stage)).sort("timestamp", maintain_order=True)
        stage, df = df["_preset"].to_numpy(), df.drop("_preset")
    if np.issubdtype(stage.dtype, np.floating):  # 2.0 is stage 2; 1.9 is refused, never truncated
        whole = stage == np.round(stage)
        if not whole.all():
            raise DataError(
                f"staging preset: stages must be whole numbers, found {float(stage[~whole][0]):g}"
            )
        stage = stage.astype(np.int64)
    check_preset_stages(stage, df["timestamp"], "staging preset")
    stage = stage.astype(np.int32)
    total = int(stage.max())
    if n_stages is not None and n_stages != total:
        raise DataError(
            f"staging preset: staging.n_stages={n_stages} but the dataset comes with {total} stages; drop "
            "staging.n_stages"
        )
    return _finish(df, stage, total, f"preset ({total} stages)")


# The settings each scheme reads; another one set beside it is said to be ignored.
_SCHEME_READS = {
    "lsat": {"n_stages", "last_n", "by", "window"},
    "single": {"last_n"},
    "peso": {"n_stages", "base_fraction"},
    "global": {"ratios", "n_stages"},
    "preset": {"n_stages", "window"},  # (a window is refused below, with a way out)
}


def assign_stages(
    df: pl.DataFrame, cfg: StagingConfig, preset: np.ndarray | None = None, synthetic_time: bool = False
) -> pl.DataFrame:
    """Stage the interactions with the scheme named in `cfg` (see `StagingConfig`).

    `preset`: the dataset's own stages (`InteractionData.preset_stages`), which `scheme: preset` needs. The
    other schemes ignore it and stage by timestamp as usual; `auto` uses it when there is one, else `lsat`.
    `synthetic_time`: the timestamps only order the rows (`InteractionData.synthetic_time`), so bins of
    time and a window of dates are refused.
    """
    if cfg.scheme == "auto":
        cfg = cfg.model_copy(update={"scheme": "preset" if preset is not None else "lsat"})
    ignored = sorted(
        k for k in cfg.model_fields_set - _SCHEME_READS[cfg.scheme] - {"scheme"}
        if getattr(cfg, k) != type(cfg).model_fields[k].default
    )  # fmt: skip
    if ignored:
        log.warning("staging.%s: not read by the %s scheme; ignored", ", staging.".join(ignored), cfg.scheme)
    if synthetic_time and cfg.scheme == "lsat" and (cfg.by == "time" or cfg.window is not None):
        raise DataError(
            "staging.by: time and staging.window cut by dates, and this data's timestamps only order its "
            "rows (PESO's release has no dates): stage it by count (by: count) or by its own stages (preset)"
        )
    if cfg.scheme == "preset":
        if cfg.window is not None:
            raise DataError(
                "staging.window fixes lsat's time bins, but this data comes in stages of its own (scheme "
                "preset): set staging.scheme: lsat to cut it by time instead, or drop the window"
            )
        if preset is None:
            raise DataError(
                "staging.scheme=preset uses the stages a dataset comes with (data.format: peso, or a "
                "table's data.columns.stage), "
                "but this data has none: map data.columns.stage to a column of stage numbers (data.format: "
                "table), read a PESO release (data.format: peso), or pick staging.scheme lsat, peso or global"
            )
        return stage_preset(df, preset, cfg.n_stages)
    if preset is not None:
        log.info("staging %s: the dataset's own stages are ignored; staging by timestamp", cfg.scheme)
    if cfg.scheme in ("lsat", "single"):  # single: one LSAT period
        return stage_lsat(
            df, cfg.num_stages, cfg.last_n, cfg.by, scheme=cfg.scheme, window=cfg.window_seconds()
        )
    if cfg.scheme == "peso":
        return stage_peso(df, cfg.num_stages, cfg.base_fraction)
    return stage_global(df, cfg.ratios)


def num_stages_of(df_staged: pl.DataFrame) -> int:
    """The number of stages T of a staged table (stage 0, history only, does not count)."""
    if "stage" not in df_staged.columns or df_staged.height == 0:
        raise DataError("num_stages_of: the table has no staged interactions (run assign_stages first)")
    return int(df_staged["stage"].max())  # type: ignore[arg-type]


def stage_table(df: pl.DataFrame, like_threshold: float | None = None) -> pl.DataFrame:
    """Per stage: interactions, users, new users, items, new items (new = first seen in that stage), the
    first and last timestamp and, given `like_threshold` (rated data), `liked`: the fraction of the stage's
    ratings above it, i.e. the positive share of its CTR labels (a drift in it moves LogLoss, not AUC).
    Stage 0 (history) is included when present."""
    first = [
        pl.col("stage").min().over("user_id").alias("_user_first"),
        pl.col("stage").min().over("item_id").alias("_item_first"),
    ]
    new = pl.col("stage") == pl.col("_user_first")
    new_item = pl.col("stage") == pl.col("_item_first")
    return (
        df.with_columns(first)
        .group_by("stage")
        .agg(
            interactions=pl.len(),
            users=pl.col("user_id").n_unique(),
            new_users=pl.col("user_id").filter(new).n_unique(),
            items=pl.col("item_id").n_unique(),
            new_items=pl.col("item_id").filter(new_item).n_unique(),
            first_timestamp=pl.col("timestamp").min(),
            last_timestamp=pl.col("timestamp").max(),
            **({} if like_threshold is None else {"liked": (pl.col("rating") > like_threshold).mean()}),
        )
        .sort("stage")
    )


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    # Loaders already sort; a stable sort here only guards library users who pass their own table.
    if df.height == 0:
        raise DataError("staging: there are no interactions to stage")
    return df if df["timestamp"].is_sorted() else df.sort("timestamp", maintain_order=True)


def _tie_end(ts: np.ndarray, cut: int) -> int:
    """Move a cut (rows [0, cut) before it) forward so it does not split a group of equal timestamps."""
    if 0 < cut < len(ts) and ts[cut - 1] == ts[cut]:
        return int(np.searchsorted(ts, ts[cut - 1], side="right"))
    return cut


def _back_where_forward_empties(ts: np.ndarray, bounds: list[int]) -> list[int]:
    """A cut moved forward past a group of equal timestamps can swallow every row of the next stage (a tie
    group at the end of the log): that cut goes back to the group's start instead, where the stage before it
    keeps rows. Cuts that leave every stage rows are not moved, so staging that worked before is unchanged."""
    bounds = list(bounds)
    for t in range(1, len(bounds) - 1):
        cut = bounds[t]
        if bounds[t + 1] > cut or cut == 0:
            continue
        start = int(np.searchsorted(ts, ts[cut - 1], side="left"))  # the tie group holding row cut - 1
        if cut - start > 1 and start > bounds[t - 1]:  # (no tie: the shares left it none, said as such)
            bounds[t] = start
    return bounds


def _equal_count(ts: np.ndarray, start: int, end: int, parts: int) -> list[int]:
    """Bounds [start, c1, .., end] cutting rows [start, end) into `parts` equal-count runs, ties unsplit."""
    bounds = [start]
    for k in range(1, parts):
        bounds.append(max(_tie_end(ts, start + k * (end - start) // parts), bounds[-1]))
    return [*bounds, end]


def _from_bounds(
    df: pl.DataFrame,
    ts: np.ndarray,
    bounds: list[int],
    label: str,
    share: Callable[[int], str] | None = None,
) -> pl.DataFrame:
    """Stage t = rows [bounds[t-1], bounds[t]); rows before bounds[0] are stage 0. `share(t)`: the change to
    the scheme's shares that gives an empty stage t rows (peso, global), for the error."""
    n_stages = len(bounds) - 1
    bounds = _back_where_forward_empties(ts, bounds)
    for t in range(1, n_stages + 1):
        if bounds[t] > bounds[t - 1]:
            continue
        window = bounds[-1] - bounds[0]
        if window < n_stages:
            why = f"only {window} interactions to cut into {n_stages} stages"
        else:
            # The group of equal timestamps that swallowed this stage's rows ends just before bounds[t].
            tie = ts[bounds[t] - 1] if bounds[t] > 0 else ts[0]
            size = int(np.count_nonzero(ts == tie))
            why = (
                f"{size} interactions share timestamp {int(tie)}, and interactions with one timestamp always "
                "stay in one stage"
            )
            if size <= 1 and share is not None:  # no tie: the stages' shares leave it none
                raise DataError(
                    f"staging {label}: stage {t} is empty: its share of the {window} interactions rounds to "
                    f"none; give it {share(t)}, or use fewer stages"
                )
        fewer = "Use fewer stages" if n_stages > 2 else "The log needs more distinct times to cut into stages"
        raise DataError(f"staging {label}: stage {t} is empty: {why}. {fewer}")
    stage = np.zeros(len(ts), dtype=np.int32)
    for t in range(1, n_stages + 1):
        stage[bounds[t - 1] : bounds[t]] = t
    return _finish(df, stage, n_stages, label)


def _time_window(
    df: pl.DataFrame, ts: np.ndarray, n_stages: int, window: tuple[int, int], scheme: str
) -> pl.DataFrame:
    """`stage_lsat` by time over a fixed window [start, end): `n_stages` bins of equal length."""
    start, end = window
    label = f"{scheme} (time, {n_stages} stages over [{start}, {end}))"
    inside = int(np.searchsorted(ts, end, "left"))
    if inside < len(ts):
        log.info("staging %s: %d interactions at or after the window's end left out", label, len(ts) - inside)
        df, ts = df[:inside], ts[:inside]
    first = int(np.searchsorted(ts, start, "left"))
    stage = np.zeros(len(ts), dtype=np.int32)
    span = end - start
    stage[first:] = (ts[first:] - start) * n_stages // span + 1  # bin k: [start + k*span/T, ...)
    counts = np.bincount(stage, minlength=n_stages + 1)
    empty = [t for t in range(1, n_stages + 1) if counts[t] == 0]
    if empty:
        raise DataError(
            f"staging {label}: stage {empty[0]} is empty: no interaction falls in its part of the window "
            f"({len(ts) - first} interactions fall inside it). Check staging.window against the data's "
            "dates (evolora data info), or use fewer stages"
        )
    return _finish(df, stage, n_stages, label)


def _finish(df: pl.DataFrame, stage: np.ndarray, n_stages: int, label: str) -> pl.DataFrame:
    counts = np.bincount(stage, minlength=n_stages + 1)
    log.info(
        "staging %s: %s interactions per stage%s",
        label,
        ", ".join(f"D{t}={counts[t]}" for t in range(1, n_stages + 1)),
        f" ({counts[0]} earlier interactions kept as history)" if counts[0] else "",
    )
    return df.with_columns(stage=pl.Series(stage, dtype=pl.Int32))
