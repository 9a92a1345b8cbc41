"""Reading a team's own tables (`data.format: table`): CSV, TSV, Parquet or JSON lines, chosen by extension.

`read_table` returns the asked-for columns as they are in the file (strings for the text formats) plus
`_line`, where each row is: the 1-based line of the file where its record starts (the header is line 1) for
CSV/TSV/JSONL, the 1-based row number for Parquet. Errors name the file, that line or row, and the problem.

CSV and TSV are parsed by polars; a pass of Python's csv module over the same text gives every record's line
(quoted fields may span lines) and checks each record has as many fields as the header, which polars would
otherwise pad or refuse without naming the line. Blank lines are skipped, and rows whose every field is
empty (",,,") too, with a counted warning. A .csv file's fields are separated
by `data.separator` (a comma unless set: ';' as spreadsheets write in many locales). TSV has no quoting: a
field ends at the next tab or newline. The text-encoding policy is the one of `evolora.data.readers`:
mapped text fields (`text`) that are not valid UTF-8 get U+FFFD and one counted warning; any other mapped
column must be valid.

(A little past 400 lines: the four formats share the line-numbering and encoding rules, kept in one place.)
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from evolora.data.readers import (
    is_gzip,
    read_jsonl,
    require_file,
    truncation_hint,
    warn_replaced_text,
    without_bom,
)
from evolora.data.times import settings_are_fixed
from evolora.errors import DataError

log = logging.getLogger("evolora.data")

_REPLACEMENT = "\ufffd"

#: file name ending -> kind; text kinds may also end in .gz
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TABLE_FILES = ".csv, .tsv, .parquet or .jsonl/.ndjson (the text ones optionally .gz)"


@dataclass(frozen=True)
class TableRows:
    """The rows of a table file: the asked-for columns plus `_line` (see the module docstring)."""

    path: Path
    frame: pl.DataFrame
    unit: str  # "line" (text files) or "row" (Parquet)
    # The last line's number when it has no newline: a file cut off in a copy or download ends that way.
    unterminated: int | None = None
    columns: tuple[str, ...] = ()  # every column the file has (a text or Parquet file's; JSON lines: none)

    def error(self, line: int, problem: str) -> DataError:
        hint = truncation_hint(line, self.unterminated) if self.unit == "line" else ""
        return DataError(f"{self.path} {self.unit} {line}: {problem}{hint}")


def table_kind(path: Path) -> str | None:
    """`csv`, `tsv`, `parquet` or `jsonl` from the file name; None for any other name."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    stem = Path(name[:-3]) if gz else Path(name)
    kind = TABLE_SUFFIXES.get(stem.suffix)
    return None if kind is None or (gz and kind == "parquet") else kind


def read_table(
    path: Path,
    columns: Iterable[str],
    text: Iterable[str] = (),
    separator: str = ",",
    log_file: Path | None = None,
) -> TableRows:
    """The named `columns` of a table file, all required to exist (see the module docstring). Columns in
    `text` follow the text-encoding policy (replaced and counted); the others must be valid UTF-8.
    `separator` separates the fields of a .csv file (quoted fields as in CSV); .tsv files use tabs.
    `log_file`: the .csv log that `separator` reads too, for an items table beside it (separator advice
    then names the log's separator, not another setting that would undo the log's)."""
    kind = table_kind(path)
    if kind is None:
        raise DataError(f"{path}: unknown table file type; data.format: table reads {TABLE_FILES}")
    require_file(path)
    wanted = list(dict.fromkeys(columns))
    text_columns = frozenset(text)
    if kind == "parquet":
        rows = _read_parquet(path, wanted, text_columns)
    elif kind == "jsonl":
        rows = _read_jsonl(path, wanted, text_columns)
    else:
        return _read_delimited(
            path, separator if kind == "csv" else "\t", wanted, text_columns, kind == "csv", log_file
        )
    return _flatten_nested(rows, text_columns)


def _flatten_nested(rows: TableRows, text: frozenset[str]) -> TableRows:
    """Parquet and JSON lines can hold lists and records in a cell. A text field's list (genres) becomes
    its entries joined by ", "; anywhere else one value per row is needed, and a nested column is named."""
    frame = rows.frame
    for name, dtype in frame.schema.items():
        if not isinstance(dtype, pl.List | pl.Array | pl.Struct):
            continue
        if name in text and isinstance(dtype, pl.List | pl.Array) and not dtype.inner.is_nested():
            entries = pl.col(name).cast(pl.List(dtype.inner)) if isinstance(dtype, pl.Array) else pl.col(name)
            frame = frame.with_columns(entries.list.eval(pl.element().cast(pl.Utf8)).list.join(", "))
            continue
        first = frame.filter(pl.col(name).is_not_null())["_line"].first()
        raise rows.error(
            int(first if first is not None else 1),
            f"column {name!r} holds {dtype} values (a list or record in each cell); it needs one value per "
            "row" + (" (a text field may hold a list of strings)" if name in text else ""),
        )
    return replace(rows, frame=frame)


def _missing_column(path: Path, where: str, column: str, present: list[str]) -> DataError:
    shown = present[:20] + (["..."] if len(present) > 20 else [])
    return DataError(f"{path}{where}: no column {column!r} (the file has {shown})")


# ----------------------------------------------------------------------------------------------- CSV / TSV


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed where it is gzip (a gzip file named .csv read as text had its
    separator guessed from compressed bytes)."""
    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz, an unreadable file
        raise DataError(f"{path}: cannot read the file ({e})") from None


# What a delimited file's first bytes say when it is no UTF-8 text: read as text, each reads as a field count
# or a separator gone wrong somewhere down the file.
_NOT_UTF8 = {
    b"\xff\xfe": "UTF-16 text (a spreadsheet's 'Unicode text' export): save it as UTF-8 (CSV UTF-8)",
    b"\xfe\xff": "UTF-16 text: save it as UTF-8",
    b"PAR1": "a Parquet file: name it .parquet",
    b"PK\x03\x04": "a zip archive (an .xlsx workbook is one): export the sheet as CSV, or unzip the file",
}


def _check_text_file(path: Path, raw: bytes) -> bytes:
    for start, what in _NOT_UTF8.items():
        if raw.startswith(start):
            raise DataError(f"{path}: the file is {what}")
    return raw


def _read_delimited(
    path: Path,
    sep: str,
    wanted: list[str],
    text: frozenset[str],
    quoted: bool = True,
    log_file: Path | None = None,
) -> TableRows:
    raw = _check_text_file(path, _read_bytes(path))
    raw = without_bom(raw)
    try:
        decoded, bad_bytes = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        decoded, bad_bytes = raw.decode("utf-8", errors="replace"), True
        raw = decoded.encode("utf-8")
    if not decoded.strip():
        raise DataError(f"{path}: file is empty")
    # The number of the last line when it has no newline (see `TableRows.unterminated`).
    unterminated = None if decoded.endswith(("\n", "\r")) else decoded.count("\n") + 1
    header, lines, blank = _record_lines(path, decoded, sep, unterminated, quoted, log_file)
    if not lines or all(blank):
        raise DataError(f"{path}: no data rows after the header")
    for column in wanted:
        if header.count(column) > 1:
            raise DataError(
                f"{path} line 1 (the header): column {column!r} is named {header.count(column)} times"
            )
        if column not in header:
            error = _missing_column(path, " line 1 (the header)", column, header)
            raise DataError(f"{error}{_separator_hint(header, sep, quoted, log_file)}")
    try:
        frame = pl.read_csv(
            raw,
            separator=sep,
            quote_char='"' if quoted else None,
            infer_schema=False,
            columns=wanted,
            raise_if_empty=False,
        )
    except Exception:
        frame = None
    if frame is None or frame.height != len(lines):
        # What polars refuses or splits otherwise, Python's csv module read record by record (a bare quote
        # inside a field, as in 12" Vinyl; lines ended by CR alone): take its reading, slower but whole.
        frame = _python_records(decoded, sep, quoted, header, wanted)
    frame = frame.with_columns(_line=pl.Series(lines, dtype=pl.Int64)).filter(~pl.Series(blank))
    rows = TableRows(path, frame, "line", unterminated, tuple(header))
    if not quoted:
        _say_csv_quotes(rows, text)
    if bad_bytes:
        _encoding_policy(rows, wanted, text)
    return rows


def _say_csv_quotes(rows: TableRows, text: frozenset[str]) -> None:
    """TSV has no quoting, so a text field written as CSV quotes it ('"12"" Vinyl"': Python's csv module and
    pandas' to_csv with sep='\\t' do, for a field holding a quote) keeps the quotes in the title: read as
    written, and said."""
    for column in sorted(text & set(rows.frame.columns)):
        # a doubled quote inside the wrapping ones: CSV's escape (a title merely in quotes may be one)
        quoted = rows.frame[column].str.contains(r'^".*"".*"$')
        if quoted.any():
            first = int(rows.frame["_line"][int(quoted.arg_max())])  # type: ignore[arg-type]
            n = int(quoted.sum())
            log.warning(
                "%s: column %r: %d %s wrapped in double quotes as CSV writes them (line %d: %s); a .tsv "
                "file has no quoting, so they are read with their quotes: write the file without quoting "
                "(pandas: quoting=csv.QUOTE_NONE), or as .csv",
                rows.path, column, n, "value is" if n == 1 else "values are", first,
                rows.frame[column][int(quoted.arg_max())],
            )  # fmt: skip


def _csv_reader(decoded: str, sep: str, quoted: bool) -> Any:
    """Python's csv module over the text: quoted fields as in CSV, or none (TSV)."""
    if quoted:
        return csv.reader(io.StringIO(decoded, newline=""), delimiter=sep, quotechar='"', strict=True)
    return csv.reader(io.StringIO(decoded, newline=""), delimiter=sep, quoting=csv.QUOTE_NONE)


def _record_lines(
    path: Path,
    decoded: str,
    sep: str,
    unterminated: int | None,
    quoted: bool = True,
    log_file: Path | None = None,
) -> tuple[list[str], list[int], list[bool]]:
    """The header's fields, and the start line and blankness of every record after it; a record whose field
    count differs from the header's raises naming its line."""
    reader = _csv_reader(decoded, sep, quoted)
    lines: list[int] = []
    blank: list[bool] = []
    empty_rows: list[int] = []
    header: list[str] | None = None
    start = 1
    try:
        for fields in reader:
            is_blank = not "".join(fields).strip()
            if header is None:
                if is_blank:
                    raise DataError(f"{path} line 1: blank; the first line must be the header (column names)")
                header = fields
            else:
                if not is_blank and len(fields) != len(header):
                    # a header of one field that holds another separator: the file is separated by that one
                    # (a ';' file whose row holds a quoted comma came here before the header's check)
                    raise DataError(
                        f"{path} line {start}: expected {len(header)} fields separated by {sep!r} (as in the "
                        f"header), found {len(fields)}"
                        + (
                            _separator_hint(header, sep, quoted, log_file)
                            or truncation_hint(start, unterminated)
                        )
                    )
                lines.append(start)
                blank.append(is_blank)
                if is_blank and len(fields) > 1:
                    empty_rows.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path} line {start}: not valid CSV ({e})") from None
    if empty_rows:  # a spreadsheet's ",,,": a row with no value, skipped as a blank line is, and counted
        n, first = len(empty_rows), empty_rows[0]
        log.warning("%s: %d rows with every field empty skipped (first on line %d)", path, n, first)
    return header or [], lines, blank


def _separator_hint(header: list[str], sep: str, quoted: bool, log_file: Path | None = None) -> str:
    """'; its fields look separated by X: set data.separator: X' for a header of one field holding X; where
    the separator cannot change (an update's batch, or an items table beside the `log_file` it reads),
    to write the file with it."""
    other = [c for c in ";|\t," if c != sep and len(header) == 1 and c in header[0]]
    if not other or not quoted:
        return ""
    if settings_are_fixed():  # an update's batch: the run's separator stays
        return (
            f"; its fields look separated by {other[0]!r}: this run reads data.separator: {sep!r}, so write "
            f"the batch's fields separated by it (not {other[0]!r})"
        )
    if log_file is not None:  # one setting reads both files: advice for this one would undo the log's
        return (
            f"; its fields look separated by {other[0]!r}, while data.separator {sep!r} reads the log "
            f"{log_file.name}: one setting reads both files, so write the items table with {sep!r} as the "
            "log is"
        )
    return f"; its fields look separated by {other[0]!r}: set data.separator: {other[0]!r}"


def _python_records(
    decoded: str, sep: str, quoted: bool, header: list[str], wanted: list[str]
) -> pl.DataFrame:
    """The `wanted` columns of every record after the header (blank ones as nulls), as `_record_lines`
    parses them."""
    reader = _csv_reader(decoded, sep, quoted)
    at = [header.index(c) for c in wanted]
    next(reader)
    values: list[list[str | None]] = [[] for _ in wanted]
    for fields in reader:
        filled = len(fields) == len(header)
        for column, i in zip(values, at, strict=True):
            column.append(fields[i] if filled else None)
    return pl.DataFrame(dict(zip(wanted, values, strict=True)), schema=dict.fromkeys(wanted, pl.Utf8))


def _encoding_policy(rows: TableRows, wanted: list[str], text: frozenset[str]) -> None:
    """After a lossy decode: replacement characters in a non-text column are an error naming the line;
    in text columns they are counted in one warning."""
    df = rows.frame
    replaced: set[int] = set()
    for column in wanted:
        hit = df[column].str.contains(_REPLACEMENT, literal=True).fill_null(False)
        if not hit.any():
            continue
        if column not in text:
            raise rows.error(int(df["_line"][hit.arg_max()]), f"column {column!r} is not valid UTF-8")
        replaced.update(df["_line"].filter(hit).to_list())
    warn_replaced_text(rows.path, sorted(replaced))


# -------------------------------------------------------------------------------------- Parquet and JSONL


def _read_parquet(path: Path, wanted: list[str], text: frozenset[str]) -> TableRows:
    try:
        present = list(pl.read_parquet_schema(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read the file as Parquet ({e})") from None
    for column in wanted:
        if column not in present:
            raise _missing_column(path, "", column, present)
    try:
        frame = pl.read_parquet(path, columns=wanted)
    except Exception as e:
        raise DataError(f"{path}: cannot read the file as Parquet ({e})") from None
    if frame.height == 0:
        raise DataError(f"{path}: the file has no rows")
    frame = frame.with_columns(_line=pl.int_range(1, frame.height + 1, dtype=pl.Int64))
    return _decoded(TableRows(path, frame, "row", columns=tuple(present)), text)


def _decoded(rows: TableRows, text: frozenset[str]) -> TableRows:
    """Binary columns (strings as some writers store them) as text under the encoding policy: bytes that
    are not UTF-8 are replaced in a text field, and an error (naming the row) anywhere else."""
    frame, replaced = rows.frame, []
    for name, dtype in frame.schema.items():
        if dtype != pl.Binary:
            continue
        try:  # valid UTF-8, as nearly always: one cast, no Python loop over the rows
            frame = frame.with_columns(pl.col(name).cast(pl.Utf8))
            continue
        except pl.exceptions.ComputeError:
            pass
        values = []
        for row, raw in zip(frame["_line"], frame[name], strict=True):
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                if name not in text:
                    raise rows.error(row, f"column {name!r} is not valid UTF-8") from None
                replaced.append(row)
                values.append(raw.decode("utf-8", "replace"))
        frame = frame.with_columns(pl.Series(name, values, dtype=pl.Utf8))
    warn_replaced_text(rows.path, sorted(set(replaced)))
    return replace(rows, frame=frame)


def _read_jsonl(path: Path, wanted: list[str], text: frozenset[str]) -> TableRows:
    # Every field as text (a number becomes its JSON text): types are settled per column afterwards.
    frame = read_jsonl(path, {c: "str" for c in wanted}, required=(), text=text)
    for column in wanted:
        if frame[column].null_count() == frame.height:
            raise DataError(f"{path}: no record has a field {column!r}")
        if column in text:
            frame = frame.with_columns(_joined_if_lists(frame[column]))
    rows = TableRows(path, frame, "line")
    for column in wanted:
        if column not in text:
            _refuse_nested(rows, column)
    return rows


def _refuse_nested(rows: TableRows, column: str) -> None:
    """A JSON list or record in a field that needs one value (an id, a time, a rating) is read as its JSON
    text; name its line, as Parquet's nested cells are named (`_flatten_nested`)."""
    values = rows.frame[column]
    maybe = values.str.strip_chars_start().str.contains(r"^[\[{]").fill_null(False)
    for line, value in zip(rows.frame["_line"].filter(maybe), values.filter(maybe), strict=True):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, list | dict):
            kind = "a list" if isinstance(parsed, list) else "a record"
            raise rows.error(
                int(line), f"field {column!r} holds {kind} ({value[:40]}); it needs one value per row"
            )


def _joined_if_lists(values: pl.Series) -> pl.Series:
    """A JSON-lines text field whose every value is a list of strings or numbers (read as its JSON text),
    as the entries joined by ", " (the Parquet reading); any other field as it is. Decided per column, so a
    title that merely looks like a list stays a title."""
    given = values.drop_nulls()
    if given.is_empty() or not given.str.starts_with("[").all():
        return values
    try:
        lists = [None if v is None else json.loads(v) for v in values]
    except json.JSONDecodeError:
        return values
    if not all(v is None or (isinstance(v, list) and all(isinstance(e, str | int | float) for e in v))
               for v in lists):  # fmt: skip
        return values
    return pl.Series(values.name, [None if v is None else ", ".join(str(e) for e in v) for v in lists])
