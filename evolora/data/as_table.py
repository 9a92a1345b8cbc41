"""A loaded dataset written out as a team's own log would be: CSV files `data.format: table` reads
(`evolora data to-csv`), the latest share of it apart as a batch of new data for `evolora update`.

`interactions.csv` holds `user`, `item`, `time` (unix seconds) and `rating` (none for implicit feedback;
`stage` for a source that comes with its own stages), sorted by time with ties in the loader's order;
`new-interactions.csv` holds the latest `new_fraction` of the rows, cut after a row count (so rows of the
cut's very second can fall on both sides: an update keeps new rows at the second the run's last stage ends);
`items.csv` holds `item`, `title` and whichever of the optional item fields the source has. Both files of
interactions hold the rows the data settings keep (`data.min_rating`, `data.max_interactions`, the k-core),
so a run on them sees what a run on the source with those settings sees.

Safe to kill and rerun: each file is written whole (a temporary, then renamed), a file already in place
with the same bytes is kept (a rerun writes only what a killed one had not), and one with other bytes is
refused unless `overwrite`, before any file is written.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from evolora.data.schema import ITEM_OPTIONAL, InteractionData
from evolora.errors import DataError
from evolora.io import atomic_write_bytes, check_writable_folder, sha256_file

INTERACTIONS, NEW_INTERACTIONS, ITEMS = "interactions.csv", "new-interactions.csv", "items.csv"
# the item fields a table reads (`sid`, a semantic ID another run made, is not the log's own)
_ITEM_FIELDS = ("title", *(f for f in ITEM_OPTIONAL if f != "sid"))


@dataclass(frozen=True)
class WrittenTable:
    """What `write_as_table` wrote: each file's rows, the files that were already there with these bytes,
    and the `data:` settings that read them back."""

    folder: Path
    rows: dict[str, int]
    kept: tuple[str, ...]
    settings: dict[str, object]


def check_new_fraction(new_fraction: float) -> None:
    """The share of the latest rows kept apart is a number, 0 <= f < 1 (checked before the data is read)."""
    if not (isinstance(new_fraction, int | float) and 0 <= new_fraction < 1 and math.isfinite(new_fraction)):
        raise DataError(f"new fraction {new_fraction!r}: the share of the latest rows kept apart, 0 <= f < 1")


def table_frames(data: InteractionData, new_fraction: float) -> dict[str, pl.DataFrame]:
    """The files' tables: interactions (and the newest `new_fraction` apart) and items."""
    check_new_fraction(new_fraction)
    if data.synthetic_time:
        raise DataError(
            f"{data.name}: its times only order the rows (no dates), and a table's times are dates: this "
            "source is not written as one"
        )
    frame = data.interactions.select(
        pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), pl.col("timestamp").alias("time")
    )
    if not data.implicit:
        frame = frame.with_columns(data.interactions["rating"])
    if data.preset_stages is not None:
        if new_fraction > 0:
            raise DataError(
                f"{data.name}: its rows come with their stages, and a batch of new rows would need one of "
                "its own: cut none off (a new fraction of 0)"
            )
        frame = frame.with_columns(pl.Series("stage", data.preset_stages))
    cut = frame.height - round(frame.height * new_fraction)
    if new_fraction > 0 and not 0 < cut < frame.height:
        raise DataError(
            f"new fraction {new_fraction}: leaves no row in one of the two files ({frame.height} rows in all)"
        )
    fields = [f for f in _ITEM_FIELDS if f in data.items.columns]
    items = data.items.select(pl.col("item_id").alias("item"), *fields)
    frames = {INTERACTIONS: frame[:cut], ITEMS: items}
    if new_fraction > 0:
        frames[NEW_INTERACTIONS] = frame[cut:]
    return frames


def table_settings(data: InteractionData, frames: dict[str, pl.DataFrame], folder: Path) -> dict[str, object]:
    """The `data:` section of a config reading the written files as `data.format: table`: each file's
    column is named as the setting it fills (`table_frames` writes them so)."""
    columns = {c: c for c in (*frames[INTERACTIONS].columns, *frames[ITEMS].columns)}
    settings: dict[str, object] = {
        "source": str(folder / INTERACTIONS),
        "format": "table",
        "meta": str(folder / ITEMS),
        "columns": columns,
    }
    if not data.implicit:
        settings["like_threshold"] = data.like_threshold  # the source's own rule, not the table default's
    return settings


def write_as_table(
    data: InteractionData, folder: str | Path, new_fraction: float = 0.0, overwrite: bool = False
) -> WrittenTable:
    """Write `data` into `folder` as `interactions.csv` (and `new-interactions.csv`) and `items.csv`."""
    folder = Path(folder).expanduser()
    frames = table_frames(data, new_fraction)
    # a batch of an earlier cut beside files without one would be taken for this data's: replaced by none
    stale = new_fraction == 0 and (folder / NEW_INTERACTIONS).exists()
    if stale and not overwrite:
        raise DataError(
            f"{folder / NEW_INTERACTIONS}: a batch of an earlier cut is there; write these files into "
            "another folder, or overwrite (--overwrite removes it)"
        )
    check_writable_folder(folder, "the table's folder")
    kept, other, texts = [], [], {}
    for name, frame in frames.items():
        buffer = io.BytesIO()  # the file's bytes once (a str and its encoding were two copies)
        frame.write_csv(buffer)
        texts[name] = text = buffer.getvalue()
        target = folder / name
        if target.exists():
            same = target.is_file() and target.stat().st_size == len(text)
            same = same and sha256_file(target) == hashlib.sha256(text).hexdigest()
            (kept if same else other).append(name)
    if other and not overwrite:
        raise DataError(
            f"{folder}: {', '.join(other)} there {'holds' if len(other) == 1 else 'hold'} another table "
            "than this data's; give another folder, or overwrite (--overwrite)"
        )
    for name, text in texts.items():
        if name not in kept:
            atomic_write_bytes(folder / name, text)
    if stale:
        (folder / NEW_INTERACTIONS).unlink(missing_ok=True)
    rows = {name: frame.height for name, frame in frames.items()}
    return WrittenTable(folder, rows, tuple(kept), table_settings(data, frames, folder))
