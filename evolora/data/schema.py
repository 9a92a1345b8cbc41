"""The one data shape every source is loaded into.

`InteractionData` holds two polars tables:

* `interactions`: `user_id` (str), `item_id` (str), `rating` (f64), `timestamp` (i64, unix seconds), sorted
  by `timestamp`, with ties kept in file order;
* `items`: `item_id` (str, unique), `title` (str), and optional `category`, `genre`, `year`, `description`
  and `sid` (str, may be null; `sid` is a semantic ID such as "<a_51><b_218><c_33><d_0>").

Pre-blocked sources (PESO's release, a table with a stage column) also carry `preset_stages`: the 1-based
stage of each interaction, row by row with `interactions`. Anything that drops or reorders interactions must
carry it along (`with_interactions` refuses a new table without it).

Every interaction's item is in `items`. Loaders build these tables and call `InteractionData.validate`, so
everything downstream (staging, samples, models) can rely on the shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace

import numpy as np
import polars as pl

from evolora.errors import ConfigError, DataError

log = logging.getLogger("evolora.data")

INTERACTION_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Utf8(),
    "item_id": pl.Utf8(),
    "rating": pl.Float64(),
    "timestamp": pl.Int64(),
}
ITEM_REQUIRED: dict[str, pl.DataType] = {"item_id": pl.Utf8(), "title": pl.Utf8()}
ITEM_OPTIONAL = ("category", "genre", "year", "description", "sid")


@dataclass(frozen=True)
class InteractionData:
    """Interactions plus item metadata of one dataset.

    `like_threshold`: an interaction counts as "liked" when `rating > like_threshold` (TALLRec's rule; 3 for
    5-star data). `source` says where the data came from, for the run record. `preset_stages` (int32, one per
    interaction, 1-based): the stages a pre-blocked source comes with; None for sources staged by time.
    `synthetic_time`: the timestamps only order the rows (PESO's release has no dates), so they are not
    shown as dates.
    `files`: the absolute paths of every file the loader read, in read order (`data_digest` hashes them).
    `implicit`: every interaction is a positive (a log of clicks or purchases, no rating or label): tasks that
    learn from labels get sampled negatives (`evolora.data.negatives`). `duplicates_removed`: exact repeats
    of an interaction the loader dropped (an update counts them among the file's rows).
    """

    name: str
    interactions: pl.DataFrame
    items: pl.DataFrame
    like_threshold: float = 3.0
    source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    preset_stages: np.ndarray | None = field(default=None, compare=False, repr=False)
    synthetic_time: bool = False
    files: tuple[str, ...] = field(default=(), compare=False)
    implicit: bool = False
    duplicates_removed: int = field(default=0, compare=False)

    def __eq__(self, other: object) -> bool:
        """Equal when every compared field is: tables by content (`DataFrame.equals`). Written out because
        the generated method asks a frame's `==` for a truth value, which polars refuses (Python 3.13
        compares field by field; earlier versions got away with it for the same frame object only)."""
        if not isinstance(other, InteractionData):
            return NotImplemented
        for f in fields(self):
            if not f.compare:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = a.equals(b) if isinstance(a, pl.DataFrame) and isinstance(b, pl.DataFrame) else a == b
            if not same:
                return False
        return True

    @property
    def n_users(self) -> int:
        return self.interactions["user_id"].n_unique()

    @property
    def n_items(self) -> int:
        return self.interactions["item_id"].n_unique()

    @property
    def n_preset_stages(self) -> int | None:
        return None if self.preset_stages is None else int(self.preset_stages.max())

    def with_interactions(
        self, interactions: pl.DataFrame, note: str | None = None, preset_stages: np.ndarray | None = None
    ) -> InteractionData:
        """A copy with new interactions. Data with preset stages needs the new rows' stages too: there is no
        way to realign the old ones to a filtered or reordered table."""
        if self.preset_stages is not None and preset_stages is None:
            raise DataError(
                f"{self.source or self.name}: this dataset has preset stages; pass the stages of the new "
                "interactions (preset_stages=...) so they stay aligned row by row"
            )
        if preset_stages is not None:
            preset_stages = np.asarray(preset_stages, dtype=np.int32)
        notes = (*self.notes, note) if note else self.notes
        return replace(self, interactions=interactions, notes=notes, preset_stages=preset_stages)

    def validate(self) -> InteractionData:
        """Check the schema and referential integrity; raise `DataError` naming the problem."""
        where = self.source or self.name
        for table, schema, what in (
            (self.interactions, INTERACTION_SCHEMA, "interaction"),
            (self.items, ITEM_REQUIRED, "item"),
        ):
            for col, dtype in schema.items():
                if col not in table.columns:
                    raise DataError(f"{where}: the {what} table has no column {col!r}")
                if table[col].dtype != dtype:
                    raise DataError(
                        f"{where}: {what} column {col!r} has type {table[col].dtype}, expected {dtype}"
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
        if self.preset_stages is not None:
            self._validate_preset(where)
        return self

    def _validate_preset(self, where: str) -> None:
        stages = self.preset_stages
        assert stages is not None
        if stages.ndim != 1 or len(stages) != self.interactions.height:
            raise DataError(
                f"{where}: {stages.size} preset stages for {self.interactions.height} interactions "
                "(loader bug: they must align row by row)"
            )
        check_preset_stages(stages, self.interactions["timestamp"], where)

    def summary(self) -> dict[str, object]:
        """What `evolora data info` prints about the whole log; the like threshold and the liked share only
        where there are ratings or labels (every row of an implicit log is a positive)."""
        ts = self.interactions["timestamp"]
        liked = (self.interactions["rating"] > self.like_threshold).mean()
        summary = {
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
            "implicit": self.implicit,
        }
        if self.implicit:
            del summary["like_threshold"], summary["liked_fraction"]
        return summary


def sort_interactions(df: pl.DataFrame, keep: tuple[str, ...] = ()) -> pl.DataFrame:
    """Chronological order; ties keep file order so results do not depend on the sort algorithm. `keep`:
    columns besides the interaction schema to carry along (a loader's per-row stage), which order ties
    before the file order does."""
    ordered = df.with_row_index("_row").sort(["timestamp", *keep, "_row"])
    return ordered.select(*INTERACTION_SCHEMA, *keep)


def item_fields(items: pl.DataFrame, fields: tuple[str, ...], setting: str) -> list[str]:
    """The `fields` the items table has, in order; none of them is a `ConfigError` naming `setting`: every
    item's text would be empty (a misspelt field, not a choice)."""
    present = [f for f in fields if f in items.columns]
    if not present:
        raise ConfigError(
            f"{setting} {list(fields)}: the items have none of these fields (they have "
            f"{[c for c in items.columns if c != 'item_id']})"
        )
    return present


def check_preset_stages(stages: np.ndarray, timestamps: pl.Series, where: str) -> None:
    """Stages a dataset comes with, row by row with its time-sorted `timestamps`: whole numbers from 1, none
    missing, and never lower than an earlier row's (a stage would train on data after its test)."""
    if not np.issubdtype(stages.dtype, np.integer):
        raise DataError(f"{where}: preset stages must be whole numbers >= 1, not {stages.dtype} values")
    if stages.min() < 1:
        raise DataError(f"{where}: preset stages must be whole numbers >= 1, found {int(stages.min())}")
    back = np.flatnonzero(np.diff(stages.astype(np.int64)) < 0)  # (unsigned ints would wrap around)
    if back.size:
        i = int(back[0]) + 1
        raise DataError(
            f"{where}: preset stages go back in time: interaction {i} (timestamp {timestamps[i]}) is in "
            f"stage {stages[i]}, after one in stage {stages[i - 1]}"
        )
    missing = sorted(set(range(1, int(stages.max()) + 1)) - set(np.unique(stages).tolist()))
    if missing:
        raise DataError(f"{where}: preset stages {missing} have no interactions")
