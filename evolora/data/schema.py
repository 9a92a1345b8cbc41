"""The one data shape every source is loaded into.

`InteractionData` holds two polars tables:

* `interactions`: `user_id` (str), `item_id` (str), `rating` (f64), `timestamp` (i64, unix seconds), sorted
  by (`timestamp`, `user_id`) with ties kept in file order;
* `items`: `item_id` (str, unique), `title` (str), and optional `category`, `genre`, `year`, `description`
  (str, may be null).

Every interaction's item is in `items`. Loaders build these tables and call `InteractionData.validate`, so
everything downstream (staging, samples, models) can rely on the shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import polars as pl

from evolora.errors import DataError

log = logging.getLogger("evolora.data")

INTERACTION_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Utf8(),
    "item_id": pl.Utf8(),
    "rating": pl.Float64(),
    "timestamp": pl.Int64(),
}
ITEM_REQUIRED: dict[str, pl.DataType] = {"item_id": pl.Utf8(), "title": pl.Utf8()}
ITEM_OPTIONAL = ("category", "genre", "year", "description")


@dataclass(frozen=True)
class InteractionData:
    """Interactions plus item metadata of one dataset.

    `like_threshold`: an interaction counts as "liked" when `rating > like_threshold` (TALLRec's rule; 3 for
    5-star data). `source` says where the data came from, for the run record.
    """

    name: str
    interactions: pl.DataFrame
    items: pl.DataFrame
    like_threshold: float = 3.0
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_users(self) -> int:
        return self.interactions["user_id"].n_unique()

    @property
    def n_items(self) -> int:
        return self.interactions["item_id"].n_unique()

    def with_interactions(self, interactions: pl.DataFrame, note: str | None = None) -> InteractionData:
        notes = (*self.notes, note) if note else self.notes
        return replace(self, interactions=interactions, notes=notes)

    def validate(self) -> InteractionData:
        """Check the schema and referential integrity; raise `DataError` naming the problem."""
        where = self.source or self.name
        for col, dtype in INTERACTION_SCHEMA.items():
            if col not in self.interactions.columns:
                raise DataError(f"{where}: interactions have no column {col!r}")
            if self.interactions[col].dtype != dtype:
                raise DataError(
                    f"{where}: interaction column {col!r} has type {self.interactions[col].dtype}, "
                    f"expected {dtype}"
                )
        for col, dtype in ITEM_REQUIRED.items():
            if col not in self.items.columns:
                raise DataError(f"{where}: item table has no column {col!r}")
            if self.items[col].dtype != dtype:
                raise DataError(
                    f"{where}: item column {col!r} has type {self.items[col].dtype}, expected {dtype}"
                )
        if self.interactions.height == 0:
            raise DataError(f"{where}: no interactions")
        nulls = self.interactions.null_count().row(0, named=True)
        bad = {k: v for k, v in nulls.items() if v}
        if bad:
            raise DataError(f"{where}: interactions contain empty values: {bad}")
        dup = self.items["item_id"].is_duplicated()
        if dup.any():
            first = self.items.filter(dup)["item_id"][0]
            raise DataError(f"{where}: item id {first!r} appears more than once in the item table")
        unknown = self.interactions.join(self.items.select("item_id"), on="item_id", how="anti")
        if unknown.height:
            raise DataError(
                f"{where}: {unknown.height} interactions refer to items missing from the item table "
                f"(first: item {unknown['item_id'][0]!r} rated by user {unknown['user_id'][0]!r})"
            )
        ts = self.interactions["timestamp"]
        if not ts.is_sorted():
            raise DataError(f"{where}: interactions are not sorted by timestamp (loader bug)")
        return self

    def summary(self) -> dict[str, object]:
        ts = self.interactions["timestamp"]
        liked = (self.interactions["rating"] > self.like_threshold).mean()
        return {
            "name": self.name,
            "source": self.source,
            "users": self.n_users,
            "items": self.n_items,
            "items_in_table": self.items.height,
            "interactions": self.interactions.height,
            "first_timestamp": int(ts.min()),  # type: ignore[arg-type]
            "last_timestamp": int(ts.max()),  # type: ignore[arg-type]
            "like_threshold": self.like_threshold,
            "liked_fraction": round(float(liked), 4),  # type: ignore[arg-type]
        }


def sort_interactions(df: pl.DataFrame) -> pl.DataFrame:
    """Chronological order; ties keep file order so results do not depend on the sort algorithm."""
    return df.with_row_index("_row").sort(["timestamp", "_row"]).drop("_row").select(list(INTERACTION_SCHEMA))
