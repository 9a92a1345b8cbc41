"""From staged interactions to samples, and from samples to per-stage train/valid/test pools.

A *sample* is one target interaction together with the user's history before it: the latest `history_len`
interactions of that user, whatever their stage (histories reach back into earlier stages and into the
history-only stage 0, as in LSAT and PESO). Only the target's stage decides which stage the sample belongs
to. Both tasks read the same samples: the CTR task renders liked/disliked titles and a yes/no label, the
next-item task renders item IDs.

Two protocols turn samples into pools:

* `next_stage` (LSAT, Shi et al. CIKM'24): stage t's samples in time order, the first 90% train and the last
  10% validation; the test pool of stage t is all of stage t, and a model trained on t is tested on t+1.
* `leave_last_out` (PESO, Yoo et al. ICLR'26): within stage t, each user's last sample is the test, the one
  before it validation, the rest train; a model trained on t is tested on t. "Last" is by time, and among a
  user's interactions of the same time by the log's order (ML-100K rates many films in one second).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from evolora.errors import DataError, EmptyStagesError

log = logging.getLogger("evolora.data")

USER_KINDS = ("active", "dormant", "new")


@dataclass(frozen=True)
class SampleTable:
    """One row per sample, in time order (`sample_id` = row number).

    Columns: `user_id`, `item_id`, `rating`, `label` (1 = liked), `timestamp`, `stage`, `hist_items`
    (list[str], oldest first), `hist_ratings` (list[f64]), `user_kind` (relative to the sample's stage:
    `active` = the user also had interactions in the previous stage, `dormant` = earlier interactions but
    none in the previous stage, `new` = none before this stage), `sampled` (True for a sampled negative of
    implicit feedback, which follows its positive: `evolora.data.negatives`; False for every real sample),
    and, in a table built from a log, `n_before` (how many of the user's interactions precede the sample's
    history end: the count `rated_before` reads). A table of queries may hold `rated` (list[str]: every item
    its user rated, which `rated_before` gives instead of the history).
    """

    df: pl.DataFrame
    n_stages: int
    history_len: int
    like_threshold: float
    #: the staged interactions the samples were built from (a reference, not a copy), which `rated_before`
    #: reads; None for a table of queries, whose histories are all that is known of them
    log: pl.DataFrame | None = None

    def __len__(self) -> int:
        return self.df.height

    def stage_rows(self, stage: int) -> np.ndarray:
        return np.flatnonzero(self.df["stage"].to_numpy() == stage)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self.df["label"].to_numpy()[rows]

    def rated_before(self, rows: np.ndarray) -> list[list[str]]:
        """Every item each row's user rated before it, oldest first, the history-only stage 0 included:
        its history without the `history_len` cut (earlier in time, and among equal times as its history
        counts them, `task.history_ties`). What `task.exclude_history: rated` leaves out of a ranking, as a
        served recommendation leaves out what the user rated. A table of queries gives each row's `rated`
        items, or without them its history."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self._from_log:
            column = "rated" if "rated" in self.df.columns else "hist_items"
            return [list(h) for h in self.df[column].gather(rows).to_list()]
        asked = self.df.select("user_id", "n_before")[rows]
        joined = asked.join(self._user_items, on="user_id", how="left", maintain_order="left")
        return joined.select(pl.col("items").list.head(pl.col("n_before"))).to_series().to_list()

    def rated_before_index(self, mapping: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """`rated_before` of every row at once, as indices: (flat, start, count), row r's items mapped by
        `mapping` (0 for an item it lacks) being flat[start[r] : start[r] + count[r]]. One int64 per
        interaction, for tasks that slice it per batch; None for a table of queries."""
        if not self._from_log:
            return None
        users = self._user_items
        lengths = users["items"].list.len().to_numpy().astype(np.int64)
        flat = users["items"].explode().replace_strict(mapping, default=0, return_dtype=pl.Int64).to_numpy()
        position = users.select("user_id", _u=pl.int_range(pl.len()))
        at = self.df.select("user_id").join(position, on="user_id", how="left", maintain_order="left")["_u"]
        return flat, (np.cumsum(lengths) - lengths)[at.to_numpy()], self.df["n_before"].to_numpy()

    @property
    def _from_log(self) -> bool:
        """Built from a log (not queries): its rows count their user's earlier items."""
        return self.log is not None and "n_before" in self.df.columns

    @functools.cached_property
    def _user_items(self) -> pl.DataFrame:
        """Each user's items in the order samples count them (`build_samples`' sort), every stage's; built
        on first use, as only some tasks read them."""
        assert self.log is not None
        return (
            self.log.with_row_index("_row")
            .sort(["user_id", "timestamp", "_row"])
            .group_by("user_id", maintain_order=True)
            .agg(items=pl.col("item_id"))
        )


def build_samples(
    staged: pl.DataFrame,
    n_stages: int,
    like_threshold: float,
    history_len: int,
    min_history: int,
    same_time: str = "log_order",
) -> SampleTable:
    """Samples for every staged interaction (stage >= 1) whose user has >= `min_history` earlier ones.

    Earlier: in time, and among interactions of the user at the same time, in the log's order
    (`same_time="log_order"`, as RecBole and the papers' code sort); with `same_time="exclude"` only strictly
    earlier times, so none of a user's same-second ratings is history for another (`task.history_ties`).
    """
    df = (
        staged.with_row_index("_row")
        .sort(["user_id", "timestamp", "_row"])
        .with_columns(_pos=pl.int_range(pl.len()).over("user_id").cast(pl.Int64))
    )
    # The position a sample's history ends before: its own, or that of its user's first interaction at its
    # time, which leaves the others of that time out.
    before = pl.col("_pos").min().over("user_id", "timestamp") if same_time == "exclude" else pl.col("_pos")
    df = df.with_columns(_before=before)
    # A sample's history: its user's `history_len` interactions before it (positions pos - history_len ..
    # pos - 1), one rolling window per user. A shift per position partitioned the table 2 x history_len
    # times: 6x slower on a 1M-row log at history_len 10, and worse the longer the history.
    if df.height > 1:
        windows = df.rolling(
            index_column="_pos",
            period=f"{history_len}i",
            offset=f"-{history_len + 1}i",
            closed="right",
            group_by="user_id",
        ).agg(hist_items=pl.col("item_id"), hist_ratings=pl.col("rating"))
        windows = windows.rename({"_pos": "_before"})
        df = df.join(windows, on=["user_id", "_before"], how="left", maintain_order="left")
    else:  # one row has no history (and polars 1.28 panics on a one-row rolling window)
        df = df.with_columns(
            hist_items=pl.concat_list("item_id").list.head(0),
            hist_ratings=pl.concat_list("rating").list.head(0),
        )
    df = df.with_columns(label=(pl.col("rating") > like_threshold).cast(pl.Int8))
    # Stages each user is seen in, to tell active / dormant / new users apart.
    first_stage = pl.col("stage").min().over("user_id")
    df = df.with_columns(_first=first_stage)
    seen = df.select("user_id", "stage").unique()
    prev = seen.with_columns((pl.col("stage") + 1).alias("stage"), _prev_active=pl.lit(True))
    df = df.join(prev, on=["user_id", "stage"], how="left")
    # "new": nothing before this stage, i.e. the user's first stage is this one.
    df = df.with_columns(
        user_kind=pl.when(pl.col("_first") >= pl.col("stage"))
        .then(pl.lit("new"))
        .when(pl.col("_prev_active").fill_null(False))
        .then(pl.lit("active"))
        .otherwise(pl.lit("dormant"))
    )
    targets = df.filter(pl.col("stage") >= 1)
    short = targets.filter(pl.col("_before") < min_history).height
    out = targets.filter(pl.col("_before") >= min_history)
    if short:
        log.info(
            "%d of %d staged interactions have fewer than %d earlier interactions and are history only",
            short,
            targets.height,
            min_history,
        )
    out = out.sort(["timestamp", "_row"]).select(
        "user_id",
        "item_id",
        "rating",
        "label",
        "timestamp",
        "stage",
        "hist_items",
        "hist_ratings",
        "user_kind",
        sampled=pl.lit(False),
        n_before=pl.col("_before").cast(pl.Int64),
    )
    present = set(out["stage"].unique().to_list())
    missing = [s for s in range(1, n_stages + 1) if s not in present]
    if missing:
        raise EmptyStagesError(
            missing,
            f"stages {missing} have no samples with at least {min_history} history items; use a smaller "
            "task.min_history, or fewer stages (staging.n_stages; a dataset's own stages are fixed) or a "
            "longer window (staging.last_n, scheme lsat)",
        )
    return SampleTable(out, n_stages, history_len, like_threshold, staged)


@dataclass(frozen=True)
class StagePools:
    """Row indices into a `SampleTable` for one stage."""

    stage: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_next_stage(table: SampleTable, valid_fraction: float = 0.1) -> dict[int, StagePools]:
    pools: dict[int, StagePools] = {}
    for s in range(1, table.n_stages + 1):
        rows = table.stage_rows(s)  # already in time order
        n_valid = max(1, round(len(rows) * valid_fraction)) if len(rows) > 1 else 0
        pools[s] = StagePools(s, rows[: len(rows) - n_valid], rows[len(rows) - n_valid :], rows)
    return pools


def split_leave_last_out(table: SampleTable) -> dict[int, StagePools]:
    df = table.df.with_row_index("_i")
    real = ~pl.col("sampled") if "sampled" in df.columns else pl.lit(True)
    # Position from the end among the real samples of (user, stage); rows are in time order. A sampled
    # negative follows its positive and takes its position, so the two land in the same pool.
    group = ["user_id", "stage"]
    # Two steps: polars 1.33 and 1.34 refuse a window expression inside another window's aggregation.
    df = df.with_columns(_back=real.cast(pl.Int64).cum_sum(reverse=True).over(group))
    df = df.select("_i", "stage", _back=pl.when(real).then(pl.col("_back")).forward_fill().over(group))
    pools: dict[int, StagePools] = {}
    for s in range(1, table.n_stages + 1):
        part = df.filter(pl.col("stage") == s)
        back = part["_back"].to_numpy()
        idx = part["_i"].to_numpy().astype(np.int64)
        pools[s] = StagePools(s, idx[back > 2], idx[back == 2], idx[back == 1])
    return pools


def split_pools(table: SampleTable, protocol: str, valid_fraction: float = 0.1) -> dict[int, StagePools]:
    if protocol == "next_stage":
        return split_next_stage(table, valid_fraction)
    if protocol == "leave_last_out":
        return split_leave_last_out(table)
    raise ValueError(f"unknown protocol {protocol!r}")


def eval_stage_of(train_stage: int, protocol: str) -> int:
    """The stage whose test pool judges a model trained on `train_stage`."""
    return train_stage + 1 if protocol == "next_stage" else train_stage


def train_stages(protocol: str, n_stages: int) -> list[int]:
    """Stages a model is trained on: the last stage of `next_stage` only serves as a test."""
    return list(range(1, n_stages)) if protocol == "next_stage" else list(range(1, n_stages + 1))


def evaluation_rows(
    pools: dict[int, StagePools], stage: int, max_samples: int | None, seed: int
) -> np.ndarray:
    """A stage's evaluation rows: a fixed-seed draw of its test pool, the same for every strategy."""
    return draw(pools[stage].test, max_samples, seed, stage, salt=2)


def matrix_stages(train_stage: int, protocol: str, n_stages: int, which: str) -> list[int]:
    """The stages whose test rows judge a model trained on `train_stage` in the stage-by-stage matrix:
    none beyond the protocol's own (`next`), every one up to it (`seen`), or every stage (`all`)."""
    if which == "next":
        return []
    last = eval_stage_of(train_stage, protocol) if which == "seen" else n_stages
    return list(range(1, last + 1))


def hold_out_evaluation_rows(
    pools: dict[int, StagePools], max_samples: int | None, seed: int, histories: SampleTable | None = None
) -> dict[int, StagePools]:
    """next_stage with a matrix (`eval.stages: seen | all`): each stage's evaluation rows leave its train and
    valid pools, so that no matrix entry scores a row its model trained on or selected epochs with. With
    `histories` (the sample table: `eval.hold_out_histories`), so do the rows whose history holds the
    interaction of a held-out row of any stage (a model is scored on every earlier stage's rows too), so that
    no held-out label reaches training even as context."""
    held_by_stage = {s: evaluation_rows(pools, s, max_samples, seed) for s in pools}
    every_held = np.concatenate(list(held_by_stage.values())) if held_by_stage else np.array([], np.int64)
    out = {}
    for s, p in pools.items():
        held = held_by_stage[s]
        if histories is not None:
            reading = rows_reading(histories, every_held, np.concatenate([p.train, p.valid]))
            log.info(
                "stage %d: %d training/validation rows read a held-out row in their history", s, len(reading)
            )
            held = np.union1d(held, reading)
        train, valid = np.setdiff1d(p.train, held), np.setdiff1d(p.valid, held)
        if len(train) == 0:
            raise DataError(
                f"stage {s}: eval.stages holds {len(held)} rows out of training (its evaluation rows, and "
                "with eval.hold_out_histories the rows that read one), which leaves no training rows (the "
                f"stage's test pool has {len(p.test)}); set eval.max_samples to a small part of each stage "
                "(e.g. 200)"
            )
        out[s] = StagePools(s, train, valid, p.test)
    return out


def rows_reading(table: SampleTable, held: np.ndarray, among: np.ndarray) -> np.ndarray:
    """The rows of `among` whose history holds the interaction of a `held` row: the same user and item, at
    or after its time (a sampled negative is no interaction: nobody's history holds it)."""
    df = table.df.with_row_index("row")
    real = ~pl.col("sampled") if "sampled" in df.columns else pl.lit(True)
    interactions = (
        df[np.asarray(held, dtype=np.int64)]
        .filter(real)
        .select("user_id", pl.col("item_id").alias("read"), pl.col("timestamp").alias("held_at"))
    )
    readers = (
        df[np.asarray(among, dtype=np.int64)]
        .select("row", "user_id", "timestamp", pl.col("hist_items").alias("read"))
        .explode("read")
        .join(interactions, on=["user_id", "read"])
        .filter(pl.col("timestamp") >= pl.col("held_at"))
    )
    return np.unique(readers["row"].to_numpy().astype(np.int64))


def draw(rows: np.ndarray, budget: int | None, seed: int, stage: int, salt: int) -> np.ndarray:
    """A reproducible subset without replacement, kept in time order.

    The generator is keyed by (seed, stage, salt) only, so every strategy with the same seed sees the same
    samples: comparisons between strategies are paired.
    """
    if budget is None or budget >= len(rows):
        return rows
    rng = np.random.default_rng([seed, stage, salt])
    return np.sort(rng.choice(rows, size=budget, replace=False))
