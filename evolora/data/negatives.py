"""Sampled negatives for implicit feedback: a log where every row is a positive gives a CTR task nothing to
tell apart, so each positive sample gets `n` negatives.

A negative of a sample is an item the user had not interacted with up to the sample's time, drawn uniformly
from the items that had appeared in the data by then (any user's interaction at or before that time: an item
from the future would leak what is to come, and a conventional model has no row for it yet). It copies the
sample's user, history, stage, timestamp and user kind, with label 0, rating 0.0 and `sampled` True, and
follows its positive in the table (so splits keep the two together). Histories come from real interactions
only: a negative is never in anyone's history. Draws without replacement within a sample; a user who had
interacted with nearly every item known by then gets fewer (counted in the log). Deterministic: one
generator seeded by `seed`, vectorised over all samples (rejection rounds, then an exact draw for the few
samples still short); the rows of each update's batch draw from a generator of their own, so a batch leaves
the earlier samples' negatives as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from evolora.data.samples import SampleTable

log = logging.getLogger("evolora.data")

_ROUNDS = 64  # rejection rounds before the exact draw takes the remaining slots
_ROW_KEY = ["user_id", "item_id", "rating", "timestamp"]  # what tells an update's rows from the log's


def add_sampled_negatives(
    table: SampleTable, staged: pl.DataFrame, n: int, seed: int, batches: Sequence[pl.DataFrame] = ()
) -> SampleTable:
    """`table` with `n` sampled negatives after each real sample (see the module docstring). `staged`: the
    interactions the samples were built from (every stage, history-only stage 0 included).

    `batches`: rows updates added to the log (`evolora update`; each batch's rows, oldest batch first, all
    in `staged`). The samples of the log's own rows draw as a run on that log alone draws, from `seed`'s
    stream over the log alone; batch k's samples from a stream of their own (`[seed, k]`) over the log up to
    that batch. So a run's negatives, and each earlier batch's, stay what they were when the next batch
    comes: one stream over every sample would hand many of them other negatives."""
    df = table.df
    if n <= 0 or df.height == 0:
        return table
    sample_origin, log_origin = _origins(df, batches), _origins(staged, batches)
    rows, slots, picked, wanted = [], [], [], np.zeros(df.height, dtype=np.int64)
    for k in range(len(batches) + 1):
        mine = np.flatnonzero(sample_origin == k)
        if not mine.size:
            continue
        if not batches:  # the whole table: the frames as they are
            samples, log_rows = df, staged
        else:
            samples, log_rows = df[mine], staged.filter(pl.Series(log_origin <= k))
        # (each batch's draw is made again by every later update: its time grows with the batches of a line,
        # ~2 s for 20 batches on a 200k-row log; the draws could be kept with the versions if lines grow long)
        rng = np.random.default_rng(seed if k == 0 else [seed, k])
        chosen, item_ids, wanted[mine] = _draw(samples, log_rows, n, rng)
        r, slot = np.nonzero(chosen >= 0)
        rows.append(mine[r])
        slots.append(slot)
        picked.append(item_ids[chosen[r, slot]])
    out = _with_negatives(df, np.concatenate(rows), np.concatenate(slots), np.concatenate(picked), n)
    short = int((wanted < n).sum())
    log.info(
        "sampled negatives: %d for %d implicit-feedback samples (%d per sample, seed %d)%s",
        out.height - df.height,
        df.height,
        n,
        seed,
        f"; {short} samples got fewer (their user had met nearly every item known by then)" if short else "",
    )
    return replace(table, df=out)


def _origins(frame: pl.DataFrame, batches: Sequence[pl.DataFrame]) -> np.ndarray:
    """Which part of the log each row of `frame` (samples or interactions) is: 0 the log's own, k the k-th
    batch (a batch's rows are new: no two parts share a row)."""
    origin = np.zeros(frame.height, dtype=np.int64)
    for k, batch in enumerate(batches, 1):
        keys = batch.select([pl.col(c).cast(frame.schema[c]) for c in _ROW_KEY])
        hit = frame.select(pl.struct(_ROW_KEY).is_in(keys.select(pl.struct(_ROW_KEY)).to_series().implode()))
        origin[hit.to_series().to_numpy()] = k
    return origin


def _draw(
    df: pl.DataFrame, staged: pl.DataFrame, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Negative item codes [samples, n] (-1: none left) drawn for the samples `df` among the items of
    `staged`, the item id of each code, and how many each sample wanted."""
    inter = staged.with_row_index("_row").sort(["timestamp", "_row"])
    # Items numbered by first appearance: the items known at time t are codes 0 .. known(t) - 1.
    first = inter.group_by("item_id", maintain_order=True).agg(pl.col("timestamp").first())
    item_ids = first["item_id"].to_numpy()
    first_seen = first["timestamp"].to_numpy()
    code_of = dict(zip(item_ids.tolist(), range(len(item_ids)), strict=True))
    users = inter["user_id"].unique(maintain_order=True).to_list()
    user_of = dict(zip(users, range(len(users)), strict=True))
    consumed = _Consumed.of(inter, user_of, code_of)
    sample_users = df["user_id"].replace_strict(user_of, return_dtype=pl.Int64).to_numpy()
    times = df["timestamp"].to_numpy()
    known = np.searchsorted(first_seen, times, side="right")
    wanted = np.minimum(known - consumed.count(sample_users, times), n)

    chosen = np.full((df.height, n), -1, dtype=np.int64)
    for slot in range(n):
        todo = np.flatnonzero(wanted > slot)
        for _ in range(_ROUNDS):
            if not todo.size:
                break
            codes = (rng.random(todo.size) * known[todo]).astype(np.int64)
            ok = ~consumed.had(sample_users[todo], codes, times[todo])
            ok &= ~(chosen[todo, :slot] == codes[:, None]).any(axis=1)
            chosen[todo[ok], slot] = codes[ok]
            todo = todo[~ok]
        for row in todo:  # a user with few items left: draw exactly from what is left
            codes = np.arange(known[row], dtype=np.int64)
            had = consumed.had(np.full(codes.size, sample_users[row]), codes, np.full(codes.size, times[row]))
            left = np.setdiff1d(codes[~had], chosen[row, :slot])
            chosen[row, slot] = rng.choice(left) if left.size else -1
    return chosen, item_ids, wanted


@dataclass(frozen=True)
class _Consumed:
    """When each user first interacted with each item: keys user * n_items + item, sorted, and their times."""

    keys: np.ndarray
    times: np.ndarray
    users: np.ndarray  # the user of each key
    n_items: int

    @classmethod
    def of(cls, inter: pl.DataFrame, user_of: dict[str, int], code_of: dict[str, int]) -> _Consumed:
        pairs = (
            inter.select(
                u=inter["user_id"].replace_strict(user_of, return_dtype=pl.Int64),
                i=inter["item_id"].replace_strict(code_of, return_dtype=pl.Int64),
                t=inter["timestamp"],
            )
            .group_by("u", "i")
            .agg(pl.col("t").min())
            .with_columns(key=pl.col("u") * len(code_of) + pl.col("i"))
            .sort("key")
        )
        return cls(pairs["key"].to_numpy(), pairs["t"].to_numpy(), pairs["u"].to_numpy(), len(code_of))

    def had(self, users: np.ndarray, codes: np.ndarray, at: np.ndarray) -> np.ndarray:
        """Whether each user had interacted with each item at or before `at`."""
        keys = users * self.n_items + codes
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return (self.keys[pos] == keys) & (self.times[pos] <= at)

    def count(self, users: np.ndarray, at: np.ndarray) -> np.ndarray:
        """How many distinct items each user had interacted with at or before `at`."""
        # (user, rank of time) as one int64: ranks are below the number of distinct times.
        all_times = np.unique(np.concatenate([self.times, at]))
        width = len(all_times) + 1
        ordered = np.sort(self.users * width + np.searchsorted(all_times, self.times))
        query = users * width + np.searchsorted(all_times, at)
        return np.searchsorted(ordered, query, side="right") - np.searchsorted(ordered, users * width)


def _with_negatives(
    df: pl.DataFrame, rows: np.ndarray, slots: np.ndarray, item_ids: np.ndarray, n: int
) -> pl.DataFrame:
    """The samples with each one's negatives right after it: sample `rows[j]`'s negative in slot `slots[j]`
    is item `item_ids[j]`."""
    negatives = df[rows].with_columns(
        item_id=pl.Series(item_ids, dtype=pl.Utf8),
        rating=pl.lit(0.0),
        label=pl.lit(0, dtype=df["label"].dtype),
        sampled=pl.lit(True),
        _order=pl.Series(rows * (n + 1) + slots + 1, dtype=pl.Int64),
    )
    real = df.with_columns(_order=pl.int_range(0, df.height * (n + 1), n + 1, dtype=pl.Int64))
    return pl.concat([real, negatives]).sort("_order").drop("_order")
