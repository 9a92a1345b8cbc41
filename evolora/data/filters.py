"""Filters applied to interactions before staging: a minimum rating, "keep the most recent N" and the k-core.

Both log what they remove, so a smaller dataset than expected can always be traced back to a filter.
"""

from __future__ import annotations

import logging

import polars as pl

log = logging.getLogger("evolora.data")


def kcore(interactions: pl.DataFrame, user_min: int, item_min: int) -> pl.DataFrame:
    """The largest subset where every user has >= `user_min` and every item >= `item_min` interactions.

    Dropping a sparse user can push an item below its minimum (and the other way round), so this repeats
    until nothing changes. The result is unique whatever the order of removals. Row order is kept.
    """
    if user_min <= 1 and item_min <= 1:
        return interactions
    keep = pl.lit(True)
    if user_min > 1:
        keep = keep & (pl.len().over("user_id") >= user_min)
    if item_min > 1:
        keep = keep & (pl.len().over("item_id") >= item_min)
    df, rounds = interactions, 0
    while True:
        kept = df.filter(keep)
        if kept.height == df.height:
            break
        df, rounds = kept, rounds + 1
    log.info(
        "k-core (users >= %d, items >= %d, %d rounds) removed %d of %d interactions, %d of %d users, "
        "%d of %d items",
        user_min,
        item_min,
        rounds,
        interactions.height - df.height,
        interactions.height,
        interactions["user_id"].n_unique() - df["user_id"].n_unique(),
        interactions["user_id"].n_unique(),
        interactions["item_id"].n_unique() - df["item_id"].n_unique(),
        interactions["item_id"].n_unique(),
    )
    return df


def keep_recent(interactions: pl.DataFrame, n: int) -> pl.DataFrame:
    """The last `n` interactions of a time-sorted table (all of them when there are fewer). Of a group of
    equal times at the cut, those later in the file are kept: exactly `n` rows, where keeping the group
    whole would overshoot by any amount (a log of dates alone) and changing the rule would change the rows
    of runs made with it."""
    if interactions.height <= n:
        return interactions
    log.info("keeping the most recent %d interactions: %d older ones removed", n, interactions.height - n)
    return interactions.tail(n)


def min_rating(interactions: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """The interactions rated >= `threshold` (RecBole's `val_interval` on the rating); row order is kept."""
    kept = interactions.filter(pl.col("rating") >= threshold)
    log.info(
        "data.min_rating %g removed %d of %d interactions (rated below it)",
        threshold,
        interactions.height - kept.height,
        interactions.height,
    )
    return kept
