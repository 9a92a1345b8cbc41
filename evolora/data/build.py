"""From the raw tables the readers return to a validated `InteractionData`: numbers parsed, ids checked, exact
duplicate interactions removed, titles filled. Nothing is dropped silently: duplicates and untitled or
unknown items are logged on the `evolora.data` logger with a count.
"""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path

import numpy as np
import polars as pl

from evolora.data.readers import truncation_hint
from evolora.data.schema import ITEM_OPTIONAL, InteractionData, sort_interactions
from evolora.data.times import EPOCH_UNITS, LAST_SECOND, SECONDS_PER_YEAR, unit_that_fits
from evolora.errors import DataError

log = logging.getLogger("evolora.data")

# All supported sources rate on 1..5 stars; rating > 3 is a like (TALLRec, LSAT).
LIKE_THRESHOLD = 3.0

_ENTITY = re.compile(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def numeric(
    df: pl.DataFrame, col: str, dtype: pl.DataType, path: Path, unterminated: int | None = None
) -> pl.Series:
    """A string (or already numeric) column as Float64/Int64; the first bad value raises naming its line."""
    s = df[col]
    if s.dtype == pl.Utf8:
        text = s.str.strip_chars()
        as_float = text.cast(pl.Float64, strict=False)
        if dtype == pl.Int64:
            # Accept "881250949" and "881250949.0" (RecBole types timestamps as float).
            whole = as_float.is_finite() & (as_float == as_float.floor())
            as_int = pl.when(whole).then(as_float).cast(pl.Int64, strict=False)
            out = pl.select(pl.coalesce(text.cast(pl.Int64, strict=False), as_int)).to_series()
        else:
            out = as_float
    else:
        out = s.cast(dtype)
    bad = out.is_null()
    if dtype == pl.Float64:
        bad = bad | ~out.is_finite()
    bad = bad.fill_null(True)
    if bad.any():
        i = bad.arg_max()
        kind = "whole number" if dtype == pl.Int64 else "number"
        line = df["_line"][i]
        raise DataError(
            f"{path} line {line}: {col} {s[i]!r} is not a {kind}{truncation_hint(line, unterminated)}"
        )
    return out.alias(col)


def join_or_null(lists: pl.Expr, sep: str) -> pl.Expr:
    """Join a list column into one string; empty lists become null."""
    stripped = pl.element().str.strip_chars()  # list.eval: polars 1.28 has no list.filter
    cleaned = lists.list.eval(stripped.filter(stripped.is_not_null() & (stripped != "")))
    return pl.when(cleaned.list.len() > 0).then(cleaned.list.join(sep))


def _unescape(text: str) -> str:
    # Only well-formed entities: a bare "&" (as in "Batman & Robin") must stay as it is.
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def check_calendar(inter: pl.DataFrame, path: Path, unit: str, time_unit: str = "s") -> None:
    """A time past the year 9999 is not a time in the format's unit (epoch milliseconds read as seconds
    land tens of thousands of years ahead); the format's reader does not know the calendar, this does.
    `unit` names a row ("line", "row"); `time_unit` is the unit the `timestamp` column is in as read."""
    per_second, unit_name = EPOCH_UNITS[time_unit]
    late = inter["timestamp"] > LAST_SECOND * per_second
    if not late.any():
        return
    i = int(late.arg_max())  # type: ignore[arg-type]
    value = int(inter["timestamp"][i])
    year = 1970 + value // per_second // SECONDS_PER_YEAR
    fits = unit_that_fits(value, time_unit)
    hint = f"; it looks like {EPOCH_UNITS[fits][1]}" if fits else ""
    many = f"; {int(late.sum())} {unit}s have such times" if late.sum() > 1 else ""
    raise DataError(
        f"{path} {unit} {inter['_line'][i]}: timestamp {value} ({unit_name}, as this format's times are "
        f"read) is in the year {year}, past the calendar{hint}{many}"
    )


def finish(
    name: str,
    source: Path,
    inter: pl.DataFrame,
    inter_file: Path,
    items: pl.DataFrame,
    item_file: Path,
    strict: bool,
    rows_are: str,
    unit: str = "line",
) -> InteractionData:
    """Check ids, drop exact duplicate interactions, fill titles, sort, validate.

    `inter` has string or typed columns plus `_line`; `items` has `item_id`, `title`, optional columns and
    `_line`. `strict` (curated MovieLens files): duplicate items and unknown items are errors. Otherwise
    (scraped Amazon files) duplicates keep their first record and unknown items get a fallback title.
    `rows_are` names the interactions in the log ("ratings", "reviews"); `unit` what `_line` counts ("line",
    or "row" for a Parquet file). A `_stage` column (whole numbers >= 1, a table's own stages) becomes the
    data's `preset_stages`, sorted with the rows; it is part of what makes two rows exact duplicates.
    """
    inter = inter.with_columns(
        rating=numeric(inter, "rating", pl.Float64, inter_file),
        timestamp=numeric(inter, "timestamp", pl.Int64, inter_file),
        user_id=pl.col("user_id").cast(pl.Utf8).str.strip_chars(),
        item_id=pl.col("item_id").cast(pl.Utf8).str.strip_chars(),
    )
    items = items.with_columns(pl.col("item_id").cast(pl.Utf8).str.strip_chars())
    check_calendar(inter, inter_file, unit)
    if rows_are in ("ratings", "reviews"):  # the packaged sources' star ratings (a table may rate otherwise)
        off = ~inter["rating"].is_between(1, 5)
        if off.any():
            i = int(off.arg_max())  # type: ignore[arg-type]
            log.warning(
                "%s: %d %s outside 1..5 stars (first on %s %d: %s); a like is a rating above 3",
                *(inter_file, int(off.sum()), rows_are, unit, inter["_line"][i], inter["rating"][i]),
            )
    for df, col, path in (
        (inter, "user_id", inter_file),
        (inter, "item_id", inter_file),
        (items, "item_id", item_file),
    ):
        empty = (df[col] == "").fill_null(True)
        if empty.any():
            raise DataError(f"{path} line {df['_line'][empty.arg_max()]}: empty {col}")

    dup = items["item_id"].is_duplicated()
    if dup.any():
        if strict:
            first_dup = items.filter(dup).group_by("item_id", maintain_order=True).agg(pl.col("_line")).row(0)
            raise DataError(
                f"{item_file} line {first_dup[1][1]}: duplicate item id {first_dup[0]!r} "
                f"(first on line {first_dup[1][0]})"
            )
        kept = items.unique("item_id", keep="first", maintain_order=True)
        repeated = items.height - kept.height
        log.warning("%s: %d repeated records of already-seen items ignored (first kept)", item_file, repeated)
        items = kept

    # Duplicates go first, so that the count of reviews of unknown items is of the reviews kept.
    key = ["user_id", "item_id", "rating", "timestamp", *(["_stage"] if "_stage" in inter.columns else [])]
    repeat = ~inter.select(pl.struct(key).is_first_distinct()).to_series()
    duplicates = int(repeat.sum())
    if duplicates:
        log.warning(
            "%s: %d exact duplicate %s removed (same user, item, rating and timestamp, times being whole "
            "seconds; first repeat on %s %d)",
            *(inter_file, duplicates, rows_are, unit, inter["_line"][repeat.arg_max()]),
        )
        inter = inter.filter(~repeat)

    unknown = inter.join(items.select("item_id"), on="item_id", how="anti")
    if unknown.height:
        if strict:
            row = unknown.sort("_line").row(0, named=True)
            raise DataError(
                f"unknown item {row['item_id']!r} in {inter_file} line {row['_line']}: not in {item_file} "
                f"({unknown.height} interactions refer to unknown items)"
            )
        missing = unknown.select("item_id").unique(maintain_order=True)
        log.warning(
            "%s: %d reviewed items (%d reviews) have no record in %s; they keep a fallback title",
            *(inter_file, missing.height, unknown.height, item_file),
        )
        items = pl.concat([items, missing], how="diagonal_relaxed")
    conflicting = inter.select(pl.struct([k for k in key if k != "rating"]).is_duplicated()).to_series()
    if conflicting.any():
        log.warning(
            "%s: %d %s share their user, item and timestamp with another of a different rating (first on %s "
            "%d); all are kept",
            *(inter_file, int(conflicting.sum()), rows_are, unit, inter["_line"][conflicting.arg_max()]),
        )
    # A user who rated an item again later: kept (both are real interactions), said, since the later one's
    # history then holds the earlier (a CTR prompt lists the item itself, with its earlier rating).
    again = inter.select(pl.col("timestamp").n_unique().over("user_id", "item_id") > 1).to_series()
    if again.any():
        log.warning(
            "%s: %d (user, item) pairs are rated at more than one time (%d %s, first on %s %d); all are "
            "kept: a later rating's history holds the earlier one",
            *(inter_file, inter.filter(again).select("user_id", "item_id").n_unique(), int(again.sum())),
            *(rows_are, unit, inter["_line"][again.arg_max()]),
        )

    # Titles: strip, unescape HTML entities, and name untitled items explicitly instead of dropping them.
    titles = items["title"].cast(pl.Utf8).str.strip_chars()
    if titles.str.contains("&", literal=True).any():
        titles = pl.Series([_unescape(t) if t and "&" in t else t for t in titles], dtype=pl.Utf8)
    items = items.with_columns(title=titles)
    untitled = items["title"].is_null() | (items["title"] == "")
    # items without a record at all were counted above already (their warning says what they are called)
    recorded = ~items["item_id"].is_in(unknown["item_id"].implode())
    if (untitled & recorded).any():
        log.warning(
            "%s: %d items have no title; they are called 'item <id>'",
            item_file,
            int((untitled & recorded).sum()),
        )
    if untitled.any():
        items = items.with_columns(
            title=pl.when(untitled).then(pl.lit("item ") + pl.col("item_id")).otherwise(pl.col("title"))
        )
    optional = [
        (pl.col(c) if c in items.columns else pl.lit(None)).cast(pl.Utf8).str.strip_chars().alias(c)
        for c in ITEM_OPTIONAL
    ]
    items = items.select("item_id", "title", *optional).with_columns(
        [pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in ITEM_OPTIONAL]
    )
    # Keep only the optional columns this source fills, so downstream code can test for their presence.
    items = items.drop([c for c in ITEM_OPTIONAL if items[c].null_count() == items.height])
    staged = "_stage" in inter.columns
    ordered = sort_interactions(inter, keep=("_stage",) if staged else ())
    data = InteractionData(
        name=name,
        interactions=ordered.drop("_stage", strict=False),
        items=items,
        like_threshold=LIKE_THRESHOLD,
        source=str(source),
        files=absolute(inter_file, item_file),
        preset_stages=ordered["_stage"].to_numpy().astype(np.int32) if staged else None,
        duplicates_removed=duplicates,
    )
    return data.validate()


def absolute(*paths: Path) -> tuple[str, ...]:
    """The `InteractionData.files` entry for the files a loader read."""
    return tuple(str(p.resolve()) for p in paths)
