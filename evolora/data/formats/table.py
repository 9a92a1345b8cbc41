"""A team's own interaction log (`data.format: table`): one row per interaction in a CSV, TSV, Parquet or
JSON-lines file, with the columns named by `data.columns`, and optionally an items table (`data.meta`).

* Files: a .csv file's fields are separated by `data.separator` (a comma unless set, e.g. ';').
* Ids: `user` and `item` values are read as text (an integer id 7 is "7"); a missing one is an error.
* Times (`data/times.py`): epoch seconds (whole numbers; `data.time_unit: ms`, `us` or `ns` for milli-,
  micro- or nanoseconds), or ISO dates and datetimes ("2024-03-01", "2024-03-01T09:30:00", with an offset
  or "Z"; naive ones are UTC). Stored as epoch seconds. A time past the year 9999 in the unit given is an
  error that names the unit it looks like (epoch milliseconds read as seconds land tens of thousands of
  years ahead).
* Labels: with `rating`, a like is rating > `data.like_threshold` (3 unless set, as for the other sources);
  with `label`, a 0/1 (or true/false) column is the like itself; with neither, every row is a positive
  (implicit feedback) and tasks that read labels get sampled negatives (`evolora.data.negatives`). Label and
  implicit data store the label as the rating (1.0 or 0.0) with a like threshold of 0.5.
* Stages: with `stage`, a column of whole numbers 1..T, each row's stage is the file's own
  (`staging.scheme: auto` or `preset` then uses them as they are: stages cut at release dates, say, or a
  log already filtered into stages). Every stage from 1 to T must have rows, and stages must follow one
  another in time: no row of stage t is later than a row of stage t+1 (equal times may be in either).
  Without the column, staging cuts by time as usual.
* Items: the item fields of `data.columns` (title, genre, category, description, year, sid) come from the
  items table, whose id column has the `item` name, or, without one, from the log (each item's first value).
  An item without a title (no title column, no record in the items table, an empty title) is called by its
  id, and the log says how many are.

Every error names the file, the line (CSV/TSV/JSONL; the header is line 1) or row (Parquet), and the problem.
Exact duplicate rows are removed with a counted warning, as for every source (`build.finish`).

(A little past 400 lines: every check of a column above names the file and line the same way, and reads
best beside the others.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from evolora.config import DataConfig, TableColumns
from evolora.data.build import LIKE_THRESHOLD, absolute, finish
from evolora.data.ids import number_form
from evolora.data.schema import InteractionData
from evolora.data.table_files import TABLE_FILES, TableRows, read_table, table_kind
from evolora.data.times import (
    EPOCH_UNITS,
    FIRST_SECOND,
    LAST_SECOND,
    SECONDS_PER_YEAR,
    day,
    epoch_numbers,
    epoch_seconds,
    outside_message,
    settings_are_fixed,
    unit_that_fits,
)
from evolora.errors import DataError

log = logging.getLogger("evolora.data")

#: the like threshold of label and implicit data, whose ratings are 1.0 (liked) or 0.0
BINARY_THRESHOLD = 0.5

#: column names that hold what a run without data.columns.rating or .label would not read
_RATING_OR_LABEL = {"rating", "ratings", "label", "labels", "stars", "clicked", "liked"}

_LABELS = {"1": 1.0, "1.0": 1.0, "true": 1.0, "0": 0.0, "0.0": 0.0, "false": 0.0}


def load_table(
    source: str | Path,
    meta: str | Path | None,
    columns: TableColumns,
    time_unit: str = "s",
    separator: str = ",",
) -> InteractionData:
    """The interactions of `source` and the items of `meta` (optional), read as the module docstring says."""
    source = Path(source)
    meta_path = Path(meta) if meta is not None else None
    wanted = {"user_id": columns.user, "item_id": columns.item, "timestamp": columns.time}
    if columns.rating is not None:
        wanted["rating"] = columns.rating
    if columns.label is not None:
        wanted["label"] = columns.label
    if columns.stage is not None:
        wanted["_stage"] = columns.stage
    fields = columns.item_fields()
    in_log = {} if meta_path is not None else fields
    rows = read_table(source, [*wanted.values(), *in_log.values()], in_log.values(), separator)
    inter = _interactions(rows, wanted, time_unit)
    if columns.stage is not None:
        _check_stage_order(rows, inter, columns.stage)
    if meta_path is not None:
        log_file = source if table_kind(source) == "csv" else None  # whose separator the items table shares
        item_columns = [columns.item, *fields.values()]
        meta_rows = read_table(meta_path, item_columns, fields.values(), separator, log_file)
        records = _item_records(meta_rows, columns.item, fields)
    else:
        records = _log_item_records(rows, inter, fields)
    items = _items(inter, records, fields, source, meta_path)
    data = finish(
        _stem(source),
        source,
        inter,
        source,
        items,
        meta_path or source,
        strict=True,
        rows_are="interactions",
        unit=rows.unit,
    )
    implicit = columns.rating is None and columns.label is None
    threshold = LIKE_THRESHOLD if columns.rating is not None else BINARY_THRESHOLD
    if implicit:
        log.info("%s: no rating or label column: every row is a positive (implicit feedback)", source)
        unread = [c for c in rows.columns if c.strip().lower() in _RATING_OR_LABEL]
        if unread:  # a 0 label or a 1-star rating read as a click would be a positive
            log.warning(
                "%s: column(s) %s not read: data.columns names no rating or label, so every row counts "
                "as a positive, a 0 label or a low rating too; leave such rows out of the file, or map the "
                "column (data.columns: {rating: ...} or {label: ...}; a run's, not an update's) unless meant",
                source, ", ".join(map(repr, unread)),
            )  # fmt: skip
    files = absolute(source, meta_path) if meta_path is not None else absolute(source)
    return replace(data, like_threshold=threshold, implicit=implicit, files=files)


# ------------------------------------------------------------------------------------------- interactions


def _interactions(rows: TableRows, wanted: dict[str, str], time_unit: str) -> pl.DataFrame:
    """`user_id`, `item_id` (text), `timestamp` (epoch seconds), `rating` (f64) and `_line`."""
    df = rows.frame.select(*(pl.col(c).alias(ours) for ours, c in wanted.items()), "_line")
    out = {
        "user_id": _ids(rows, df, "user_id", wanted["user_id"], "user id"),
        "item_id": _ids(rows, df, "item_id", wanted["item_id"], "item id"),
        "timestamp": _times(rows, df, wanted["timestamp"], time_unit),
    }
    if "rating" in wanted:
        out["rating"] = _ratings(rows, df, wanted["rating"])
    elif "label" in wanted:
        out["rating"] = _labels(rows, df, wanted["label"])
    else:
        out["rating"] = pl.Series("rating", [1.0] * df.height, dtype=pl.Float64)
    if "_stage" in wanted:
        out["_stage"] = _stages(rows, df, wanted["_stage"])
    return pl.DataFrame({**out, "_line": df["_line"]})


def _ids(rows: TableRows, df: pl.DataFrame, col: str, name: str, what: str) -> pl.Series:
    written = _float_ids(rows, df, col, name) if df[col].dtype.is_float() else df[col].cast(pl.Utf8)
    ids = written.str.strip_chars()  # (queries name an id with or without them: `ids.known_form`)
    merged = written.n_unique() - ids.n_unique()
    if merged:  # "bob" and "bob " were two ids in the file: said, as they become one
        forms = pl.DataFrame({"written": written, "id": ids}).drop_nulls().unique(maintain_order=True)
        alike = forms.filter(pl.len().over("id") > 1)
        example = alike.filter(pl.col("id") == alike["id"][0])["written"].head(2).to_list()
        log.warning(
            "%s: %d %ss differ from others only by spaces at their ends (e.g. %s) and are read as one: ids "
            "are read without such spaces; if they are different %ss, tell them apart otherwise",
            rows.path, merged, what, " and ".join(map(repr, example)), what,
        )  # fmt: skip
    empty = (ids == "").fill_null(True)
    if empty.any():
        raise rows.error(int(df["_line"][empty.arg_max()]), f"no {what} (column {name!r} is empty)")
    _say_numbers_written_two_ways(rows, ids, what)
    gaps = ids.is_in(list(MISSING_AS_TEXT))
    if gaps.any():
        word = ids.filter(gaps)[0]
        log.warning(
            "%s: %d rows have the %s %r (how pandas and others write a missing value as text), read as one "
            "%s of that name: if their ids are missing, leave those rows out",
            rows.path, int(gaps.sum()), what, word, what.removesuffix(" id"),
        )  # fmt: skip
    return ids


#: a missing value written as text by pandas (`astype(str)` of NaN or None), R or a database export
MISSING_AS_TEXT = frozenset({"nan", "NaN", "None", "null", "NULL", "<NA>", "NA", "N/A"})


def _float_ids(rows: TableRows, df: pl.DataFrame, col: str, name: str) -> pl.Series:
    """Ids stored as floats (a pandas column of ints with a gap) as text: whole numbers as an int column
    writes them (5.0 is id "5"; beside a fractional id the column is read as floats, "5.0", as it always
    was: runs made on such files keep their ids); a NaN is a missing id (pandas writes gaps so), not the id
    "NaN", and an infinite one an error. Past 2^53 (2^24 in float32) a float has lost the id's last digits,
    so ids that differed may be one: an error."""
    raw = df[col].fill_nan(None)
    digits = 24 if raw.dtype == pl.Float32 else 53
    for bad, said in (
        (raw.is_infinite(), "holds an infinite number, not an id"),
        (raw.abs() >= 2**digits, f"holds ids stored as floating-point numbers past 2^{digits}, whose last "
         "digits are lost, so different ids may read as one: write the column as integers or text"),
    ):  # fmt: skip
        if bad.fill_null(False).any():
            i = int(bad.fill_null(False).arg_max())  # type: ignore[arg-type]
            raise rows.error(int(df["_line"][i]), f"column {name!r} {said} ({raw[i]:.6g})")
    given = raw.drop_nulls()
    if bool((given == given.floor()).all()):
        return raw.cast(pl.Int64).cast(pl.Utf8)
    return raw.cast(pl.Utf8)


def _say_numbers_written_two_ways(rows: TableRows, ids: pl.Series, what: str) -> None:
    """'18' beside '18.0' or '007' beside '7' in one column: one number written two ways (an export that
    turned part of a column into floats, or padded some), read as two ids, so said."""
    numbers = ids.unique().drop_nulls()
    numbers = numbers.filter(numbers.str.contains(r"^[0-9]+(?:\.0*)?$"))
    if numbers.len() < 2:
        return
    forms = pl.DataFrame({"written": numbers}).with_columns(form=number_form(pl.col("written")))
    alike = forms.filter(pl.len().over("form") > 1).sort("form", "written")
    if alike.height:
        example = alike.filter(pl.col("form") == alike["form"][0])["written"].head(2).to_list()
        log.warning(
            "%s: %d %ss are numbers written two ways in the file (e.g. %s), read as different %ss: if they "
            "are one, write each id one way",
            rows.path, alike["form"].n_unique(), what, " and ".join(map(repr, example)), what,
        )  # fmt: skip


def _times(rows: TableRows, df: pl.DataFrame, name: str, unit: str) -> pl.Series:
    seconds = epoch_seconds(df["timestamp"], unit)
    bad = seconds.is_null()
    if bad.any():
        i = int(bad.arg_max())  # type: ignore[arg-type]
        value = df["timestamp"][i]
        line = int(df["_line"][i])
        if value is None or (isinstance(value, str) and not value.strip()):
            raise rows.error(line, f"no time (column {name!r} is empty)")
        raise rows.error(
            line,
            f"time {value!r} (column {name!r}) is neither {EPOCH_UNITS[unit][1]} nor an ISO date or datetime",
        )
    outside = (seconds < FIRST_SECOND) | (seconds > LAST_SECOND)
    if outside.any():
        i = int(outside.arg_max())  # type: ignore[arg-type]
        raise rows.error(int(df["_line"][i]), outside_message(df["timestamp"][i], seconds[i], name, unit))
    # Epoch numbers in 1970 beside times decades later: one column holding two units (seconds and
    # milliseconds, or yyyymmdd numbers among epoch seconds); no log of numbers spans that. An ISO time or a
    # date says its own year (a log may well run from 1969 to 1991).
    numbers = epoch_numbers(df["timestamp"])
    early, late = (seconds < SECONDS_PER_YEAR) & numbers, seconds >= 20 * SECONDS_PER_YEAR
    if early.any() and late.any():
        i, j = int(early.arg_max()), int(late.arg_max())  # type: ignore[arg-type]
        raise rows.error(
            int(df["_line"][i]),
            f"time {df['timestamp'][i]!r} (column {name!r}) reads as {day(seconds[i])} but "
            f"{df['timestamp'][j]!r} ({rows.unit} {df['_line'][j]}) as {day(seconds[j])}: the column mixes "
            f"units or formats; give every time in one (data.time_unit: {unit} reads {EPOCH_UNITS[unit][1]})",
        )
    latest = seconds.max()
    if unit == "s" and bool(df["timestamp"].cast(pl.Utf8).str.contains(r"^\s*(19|20)\d{6}\s*$").all()):
        log.warning(
            "%s: the times in column %r look like yyyymmdd dates (%s), read as epoch seconds (in 1970): "
            "write them as ISO dates (2024-03-01)", rows.path, name, df["timestamp"][0],
        )  # fmt: skip
    elif (
        unit != "s"
        and not settings_are_fixed()
        and isinstance(latest, int)
        and 0 <= latest < SECONDS_PER_YEAR
    ):
        fits = unit_that_fits(latest * EPOCH_UNITS[unit][0], unit)
        if fits:
            log.warning(
                "%s: every time in column %r falls in 1970 as %s; if they are %s, set data.time_unit: %s",
                rows.path, name, EPOCH_UNITS[unit][1], EPOCH_UNITS[fits][1], fits,
            )  # fmt: skip
    return seconds.alias("timestamp")


def _ratings(rows: TableRows, df: pl.DataFrame, name: str) -> pl.Series:
    return _numbers(rows, df["rating"], df["_line"], name, "rating", lambda x: x.is_finite(), "not a number")


def _stages(rows: TableRows, df: pl.DataFrame, name: str) -> pl.Series:
    def whole(x: pl.Series) -> pl.Series:
        return x.is_finite() & (x == x.floor()) & (x >= 1) & (x < 2**31)

    stages = _numbers(rows, df["_stage"], df["_line"], name, "stage", whole, "not a whole number >= 1")
    return stages.cast(pl.Int32).alias("_stage")


def _numbers(
    rows: TableRows,
    raw: pl.Series,
    lines: pl.Series,
    name: str,
    what: str,
    valid: Callable[[pl.Series], pl.Series],
    invalid: str,
) -> pl.Series:
    """`raw` (numbers, or text holding them) as Float64 named `what`; an error names the first line whose
    value is empty or not `valid` (whose value "is `invalid`")."""
    if isinstance(raw.dtype, pl.Categorical | pl.Enum):  # pandas' `category` of "1".."5"
        raw = raw.cast(pl.Utf8)
    numbers = raw.str.strip_chars().cast(pl.Float64, strict=False) if raw.dtype == pl.Utf8 else raw
    if not numbers.dtype.is_numeric():
        raise rows.error(int(lines[0]), f"column {name!r} holds {raw.dtype} values, not {what}s")
    numbers = numbers.cast(pl.Float64)
    bad = ~valid(numbers).fill_null(False)
    if bad.any():
        i = int(bad.arg_max())  # type: ignore[arg-type]
        value, line = raw[i], int(lines[i])
        if value is None or (isinstance(value, str) and not value.strip()):
            raise rows.error(line, f"no {what} (column {name!r} is empty)")
        raise rows.error(line, f"{what} {value!r} (column {name!r}) is {invalid}")
    return numbers.alias(what)


def _check_stage_order(rows: TableRows, inter: pl.DataFrame, name: str) -> None:
    """Stages follow one another in time: in time order (ties by stage), a stage never goes back."""
    ordered = inter.select("timestamp", "_stage", "_line").sort(["timestamp", "_stage", "_line"])
    stage = ordered["_stage"].to_numpy()
    back = np.flatnonzero(stage[1:] < stage[:-1])
    if back.size:
        early, late = ordered.row(int(back[0])), ordered.row(int(back[0]) + 1)
        raise rows.error(
            late[2],
            f"stage {late[1]} (column {name!r}) at {_when(late[0])} is later than stage {early[1]} at "
            f"{_when(early[0])} ({rows.unit} {early[2]}): stages must follow one another in time",
        )


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _labels(rows: TableRows, df: pl.DataFrame, name: str) -> pl.Series:
    raw = df["label"]
    text = raw.cast(pl.Utf8).str.strip_chars().str.to_lowercase()
    labels = text.replace_strict(_LABELS, default=None, return_dtype=pl.Float64)
    bad = labels.is_null()
    if bad.any():
        i = int(bad.arg_max())  # type: ignore[arg-type]
        value, line = raw[i], int(df["_line"][i])
        if value is None or (isinstance(value, str) and not value.strip()):
            raise rows.error(line, f"no label (column {name!r} is empty)")
        raise rows.error(line, f"label {value!r} (column {name!r}) must be 0 or 1 (or true/false)")
    return labels.alias("rating")


# ------------------------------------------------------------------------------------------------- items


def _item_records(rows: TableRows, id_column: str, fields: dict[str, str]) -> pl.DataFrame:
    """The items table's records: `item_id`, the mapped fields (text) and `_line`; ids unique."""
    df = rows.frame
    records = df.select(
        item_id=_ids(rows, df, id_column, id_column, "item id"),
        **{f: pl.col(c).cast(pl.Utf8) for f, c in fields.items()},
        _line=pl.col("_line"),
    )
    repeated = records["item_id"].is_duplicated()
    if repeated.any():
        item, lines = (
            records.filter(repeated).group_by("item_id", maintain_order=True).agg(pl.col("_line")).row(0)
        )
        raise rows.error(lines[1], f"item id {item!r} appears again (first on {rows.unit} {lines[0]})")
    return records


def _log_item_records(rows: TableRows, inter: pl.DataFrame, fields: dict[str, str]) -> pl.DataFrame:
    """Item fields read from the log itself: each item's first non-empty value, in file order."""
    df = rows.frame.select(
        item_id=inter["item_id"],
        _line=pl.col("_line"),
        **{f: pl.col(c).cast(pl.Utf8) for f, c in fields.items()},
    )
    given = {f: pl.col(f).filter(pl.col(f).str.strip_chars() != "") for f in fields}
    titles = [given["title"].n_unique().alias("_titles")] if "title" in given else []
    records = df.group_by("item_id", maintain_order=True).agg(
        pl.col("_line").first(), *(value.first().alias(f) for f, value in given.items()), *titles
    )
    if titles:
        differ = int((records["_titles"] > 1).sum())
        if differ:
            log.warning(
                "%s: %d items have more than one title in the file; each keeps its first", rows.path, differ
            )
        records = records.drop("_titles")
    return records


def _items(
    inter: pl.DataFrame, records: pl.DataFrame, fields: dict[str, str], source: Path, meta: Path | None
) -> pl.DataFrame:
    """Every record plus a bare one for each logged item without a record; untitled items get their id as
    title, with a log line counting them."""
    missing = inter.select("item_id").unique(maintain_order=True).join(records, on="item_id", how="anti")
    if meta is not None and missing.height:
        log.warning(
            "%s: %d of %d items in %s have no record here; they are called by their id",
            *(meta, missing.height, inter["item_id"].n_unique(), source),
        )
    items = pl.concat([records, missing], how="diagonal_relaxed")
    if "title" not in fields:
        log.warning(
            "%s: no title column (data.columns.title): the %d items are called by their id",
            *(meta or source, items.height),
        )
        return items.with_columns(title=pl.col("item_id"))
    title = pl.col("title").str.strip_chars()
    untitled = items.select(title.is_null() | (title == "")).to_series()
    if (n := int(untitled.sum()) - (missing.height if meta is not None else 0)) > 0:
        log.warning("%s: %d items have an empty title; they are called by their id", meta or source, n)
    return items.with_columns(title=pl.when(untitled).then(pl.col("item_id")).otherwise(title))


def _stem(path: Path) -> str:
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


# ------------------------------------------------------------------------------------------ registry hooks


def detect(path: Path, meta: str | None) -> bool:
    """Never guessed: a table's columns have to be named. A table file under `auto` gets the way to say so."""
    if path.is_file() and table_kind(path) is not None:
        raise DataError(
            f"{path}: a table of your own is not guessed; set data.format: table and data.columns "
            "(at least {user: ..., item: ..., time: ...}; see the README's 'Your own data')"
        )
    return False


def resolve(path: Path, meta: str | None) -> tuple[Path, Path | None]:
    if path.is_dir():
        raise DataError(f"{path}: data.format: table reads one file ({TABLE_FILES}), not a folder")
    return path, Path(meta).expanduser() if meta else None


def options(cfg: DataConfig) -> dict[str, object]:
    """The loader's settings from the config: the column names, the unit of epoch times, the separator of
    .csv files."""
    return {"columns": cfg.columns, "time_unit": cfg.time_unit, "separator": cfg.separator}
