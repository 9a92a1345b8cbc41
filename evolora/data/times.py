"""Times of a team's own log as whole epoch seconds (`data.format: table`, `data.time_unit`).

Numbers are epoch seconds, milliseconds, micro- or nanoseconds as `data.time_unit` says; text that is not a
number is an ISO date or datetime (naive ones are UTC). A time outside the calendar (years 1-9999) in the unit
given is a wrong unit, and the messages here name the unit it looks like.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

import polars as pl

_ISO_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
)

#: data.time_unit -> (units per second, name)
EPOCH_UNITS = {
    "s": (1, "epoch seconds"),
    "ms": (1_000, "epoch milliseconds"),
    "us": (1_000_000, "epoch microseconds"),
    "ns": (1_000_000_000, "epoch nanoseconds"),
}
# Calendar dates exist for the years 1..9999 (Python's datetime); a time outside them is a wrong unit.
FIRST_SECOND, LAST_SECOND = -62_135_596_800, 253_402_300_799
SECONDS_PER_YEAR = 31_556_952  # the Gregorian mean


# Set while an update reads a batch: the run's data settings (time unit, separator) are fixed then, so advice
# to set another one would be advice the user cannot follow; the messages say to write the file in them.
_SETTINGS_FIXED: ContextVar[bool] = ContextVar("evolora_data_settings_fixed", default=False)


@contextmanager
def settings_fixed() -> Iterator[None]:
    """Within it, messages about a file's times in the wrong unit or fields in the wrong separator advise
    writing it in the run's unit or separator, not setting another `data.time_unit` or `data.separator` (a
    new batch of a run: the run's settings cannot change)."""
    token = _SETTINGS_FIXED.set(True)
    try:
        yield
    finally:
        _SETTINGS_FIXED.reset(token)


def settings_are_fixed() -> bool:
    return _SETTINGS_FIXED.get()


def fixed_unit_advice(unit: str) -> str:
    return (
        f"this run reads data.time_unit: {unit}, so write the batch's times in it (or as ISO dates: "
        "2024-03-01T12:00:00)"
    )


def day(seconds: int, with_time: bool = False) -> str:
    """The UTC date of epoch `seconds` (2024-03-01; `with_time`: 2024-03-01 12:00:00), or "out of range"
    past the calendar."""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S" if with_time else "%Y-%m-%d")
    except (OverflowError, OSError, ValueError):
        return "out of range"


def outside_message(value: object, seconds: int, name: str, unit: str) -> str:
    year = 1970 + seconds // SECONDS_PER_YEAR
    if not is_epoch_number(value):  # an ISO time or a date says its own year: no unit reads it otherwise
        return f"time {value!r} (column {name!r}) is outside the calendar evolora reads (years 1-9999 UTC)"
    message = f"time {value!r} (column {name!r}) read as {EPOCH_UNITS[unit][1]} is in the year {year}"
    fits = unit_that_fits(seconds * EPOCH_UNITS[unit][0], unit)
    if settings_are_fixed():
        looks = f"; it looks like {EPOCH_UNITS[fits][1]}" if fits else ", outside the calendar (years 1-9999)"
        return f"{message}{looks}: {fixed_unit_advice(unit)}"
    if fits:
        return f"{message}; it looks like {EPOCH_UNITS[fits][1]}: set data.time_unit: {fits}"
    return f"{message}, outside the calendar (years 1-9999); data.time_unit: {', '.join(EPOCH_UNITS)}"


_NUMBER = r"^\s*[+-]?\d+(\.\d*)?([eE][+-]?\d+)?\s*$"


def is_epoch_number(value: object) -> bool:
    """Whether a time value is an epoch number (a number, or text that is one), which `data.time_unit` reads;
    ISO text and dates are not."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and re.match(_NUMBER, value) is not None)


def _as_read(values: pl.Series) -> pl.Series:
    """A time column in the type its values are read as: pandas' `category` written to Parquet (Categorical,
    Enum) as text, Decimal as floats."""
    if isinstance(values.dtype, pl.Categorical | pl.Enum):
        return values.cast(pl.Utf8)
    if isinstance(values.dtype, pl.Decimal):
        return values.cast(pl.Float64)
    return values


def epoch_numbers(values: pl.Series) -> pl.Series:
    """`is_epoch_number` of each value of a time column (False where null)."""
    values = _as_read(values)
    if values.dtype.is_numeric():
        return values.is_not_null()
    if values.dtype == pl.Utf8:
        return values.str.contains(_NUMBER).fill_null(False)
    return pl.Series(values.name, [False] * values.len(), dtype=pl.Boolean)


def unit_that_fits(raw: int, unlike: str) -> str | None:
    """The unit other than `unlike` that reads the number `raw` as a time in 1971-2200, if one does."""
    for unit, (per_second, _) in EPOCH_UNITS.items():
        if unit != unlike and SECONDS_PER_YEAR <= raw // per_second <= 230 * SECONDS_PER_YEAR:
            return unit
    return None


def epoch_seconds(values: pl.Series, unit: str = "s") -> pl.Series:
    """Times as whole epoch seconds (Int64); null where a value is missing or not a time.

    Numbers (and numeric text) are epoch `unit`s (`s`, `ms`, `us` or `ns`); text that is not a number is an
    ISO date or datetime (naive ones are UTC); Parquet dates and datetimes are taken as they are.
    """
    per_second = EPOCH_UNITS[unit][0]
    values = _as_read(values)
    dtype = values.dtype
    if dtype == pl.Date or isinstance(dtype, pl.Datetime):
        return values.cast(pl.Datetime("us")).dt.epoch("s") if dtype == pl.Date else values.dt.epoch("s")
    if dtype.is_integer():  # an unsigned number past Int64 (a -1 sentinel written unsigned) is no time
        return values.cast(pl.Int64, strict=False) // per_second
    if dtype.is_float():
        return _whole_seconds(values.cast(pl.Float64), per_second)
    if dtype != pl.Utf8:
        return pl.Series(values.name, [None] * values.len(), dtype=pl.Int64)
    text = values.str.strip_chars()
    numeric = pl.select(
        pl.coalesce(
            text.cast(pl.Int64, strict=False) // per_second,
            _whole_seconds(text.cast(pl.Float64, strict=False), per_second),
        )
    ).to_series()
    # ISO 8601's four-digit year first: polars' %Y also reads "02-01-24" (a day-month-year) as the year 2
    dated = pl.select(pl.when(text.str.contains(r"^\d{4}-")).then(text)).to_series()
    iso = [dated.str.to_datetime(f, strict=False, time_unit="us").dt.epoch("s") for f in _ISO_FORMATS]
    seconds = pl.select(pl.coalesce(numeric, *iso)).to_series()
    rest = text.filter(seconds.is_null() & text.is_not_null()).unique().to_list()
    if rest:  # the ISO forms the fixed formats miss ("2024-03-01T09:30", "+0200" offsets): Python's parser
        parsed = {v: s for v in rest if (s := _python_iso(v)) is not None}
        if parsed:
            found = text.replace_strict(parsed, default=None, return_dtype=pl.Int64)
            seconds = pl.select(pl.coalesce(seconds, found)).to_series()
    return seconds.alias(values.name)


def _whole_seconds(numbers: pl.Series, per_second: int) -> pl.Series:
    finite = numbers.is_finite().fill_null(False) & (numbers.abs() < 2**62)
    return pl.select(pl.when(finite).then((numbers / per_second).floor()).cast(pl.Int64)).to_series()


def _python_iso(text: str) -> int | None:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp())
