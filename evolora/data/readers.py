"""What the format families (`evolora.data.formats`) share for reading files: line-numbered text and
JSON-lines readers. `evolora.data.build` turns what they read into a validated `InteractionData`.

Bad input raises `DataError` naming the file, the 1-based line (counting the header where there is one) and
the problem; a last line without a newline (a file cut off in a copy or download) is named as such.
Replaced text is logged on the `evolora.data` logger with a count and the first line.

Text encoding: ids, ratings and timestamps must be valid text in the file's encoding, else `DataError`. Text
fields (titles, descriptions, categories, genres) that are not valid UTF-8 are decoded with U+FFFD
replacement characters and the reader logs one warning with the number of affected lines and the first one.

Text files are split in Python (exact line numbers for errors, ~1 s per million lines) and converted to
numbers column-wise by polars. JSON-lines files are read in chunks of ~64 MB: polars parses each chunk, and
a chunk polars rejects is parsed again line by line, which finds the bad line for the error message and also
accepts the python-literal lines (`{'asin': ...}`) of some Amazon 2018 metadata files. So several-GB files
stream through with only the kept columns in memory.

A little past 400 lines: the text and JSON-lines readers share their error reporting (file, line, cut-off
last line) and their handling of text that is not UTF-8.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import logging
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import polars as pl

from evolora import progress
from evolora.errors import DataError

log = logging.getLogger("evolora.data")

_REPLACEMENT = "\ufffd"


def require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (" (it is a folder)" if path.is_dir() else ""))


def published_or_utf8(path: Path, published: str) -> str:
    """The encoding to read a small text file in: its `published` one (GroupLens' latin-1), unless the file
    was re-saved as UTF-8. Its accented letters are then valid multi-byte UTF-8, which latin-1 text with
    accents almost never is; read as latin-1 they would become "MisÃ©rables"."""
    require_file(path)
    raw = path.read_bytes()
    if raw.isascii():
        return published
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return published
    log.info(
        "%s: read as UTF-8 (its published encoding is %s; this copy was re-saved as UTF-8)", path, published
    )
    return "utf-8"


def names_in(path: Path) -> set[str]:
    """The file names a format is recognised by: a folder's entries, or the file's own name."""
    return {p.name for p in path.iterdir()} if path.is_dir() else {path.name}


def warn_replaced_text(path: Path, lines: list[int]) -> None:
    """Log the text-encoding policy's one warning for a file (see the module docstring)."""
    if lines:
        log.warning(
            "%s: %d lines have text fields that are not valid UTF-8 (first: line %d); the bad bytes became "
            "U+FFFD replacement characters",
            *(path, len(lines), min(lines)),
        )


# ------------------------------------------------------------------------------------------------ text files


class TextLine(NamedTuple):
    """One line of a text file, as `text_lines` yields it."""

    number: int  # 1-based
    text: str  # without its newline; undecodable bytes replaced by U+FFFD
    terminated: bool  # False only for a last line without a newline
    bad_encoding: str | None  # why the raw line is not valid text in the encoding, else None


@dataclass(frozen=True)
class TextRows:
    """The rows of a delimited text file: string columns plus `_line`, the 1-based line of each row."""

    path: Path
    frame: pl.DataFrame
    # The last line's number when it has no newline: a file cut off in a copy or download ends that way.
    unterminated: int | None = None

    def error(self, line: int, problem: str) -> DataError:
        return DataError(f"{self.path} line {line}: {problem}{truncation_hint(line, self.unterminated)}")


def truncation_hint(line: int, unterminated: int | None) -> str:
    if line != unterminated:
        return ""
    return f"; line {line} is the file's last and has no newline, so the file looks truncated"


def without_bom(first_line: bytes) -> bytes:
    """A file's first line (or whole content) without a UTF-8 byte order mark, which spreadsheets and some
    editors and exporters write: read on, it would become part of the first id or field name."""
    return first_line.removeprefix(b"\xef\xbb\xbf")


def text_lines(path: Path, encoding: str) -> Iterator[TextLine]:
    """Each non-blank line of a text file, without a UTF-8 byte order mark at its start (a file saved by a
    spreadsheet or editor; read as latin-1 it would become part of the first user's or item's id)."""
    require_file(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = without_bom(raw)
            bad = None
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as e:
                bad, text = e.reason, raw.decode(encoding, errors="replace")
            if text.strip():
                yield TextLine(n, text.rstrip("\r\n"), raw.endswith(b"\n"), bad)


def read_delimited(path: Path, sep: str, columns: list[str], encoding: str) -> TextRows:
    """A headerless delimited file with exactly `len(columns)` fields a line, in an `encoding` that decodes
    the whole file (latin-1, where every byte does, or UTF-8 where `published_or_utf8` found it does)."""
    cols: list[list[str]] = [[] for _ in columns]
    lines: list[int] = []
    unterminated = None
    for line in text_lines(path, encoding):
        n = line.number
        unterminated = None if line.terminated else n
        if line.bad_encoding:
            raise DataError(f"{path} line {n}: not valid {encoding} text ({line.bad_encoding})")
        fields = line.text.split(sep)
        if len(fields) != len(columns):
            raise DataError(
                f"{path} line {n}: expected {len(columns)} fields separated by {sep!r}, found {len(fields)}"
                + truncation_hint(n, unterminated)
            )
        for col, value in zip(cols, fields, strict=True):
            col.append(value)
        lines.append(n)
    if not lines:
        raise DataError(f"{path}: file is empty")
    frame = pl.DataFrame(
        {**dict(zip(columns, cols, strict=True)), "_line": lines}, schema_overrides={"_line": pl.Int64}
    )
    return TextRows(path, frame, unterminated)


def read_atomic(
    path: Path,
    required: dict[str, tuple[str, ...]],
    optional: dict[str, tuple[str, ...]] | None = None,
    text: Iterable[str] = (),
) -> TextRows:
    """A RecBole atomic file (UTF-8, tab-separated, header `name:type`). `required`/`optional` map our column
    name to accepted header names; columns named in `text` follow the text-encoding policy."""
    rows = text_lines(path, "utf-8")
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: file is empty")
    header = [h.split(":", 1)[0].strip() for h in first.text.split("\t")]
    picks: dict[str, int | None] = {}
    for ours, accepted in {**required, **(optional or {})}.items():
        idx = next((header.index(a) for a in accepted if a in header), None)
        if idx is None and ours in required:
            raise DataError(
                f"{path} line {first.number}: missing column {accepted[0]!r} (header has {header})"
            )
        picks[ours] = idx
    text_columns = set(text)
    cols: dict[str, list[str | None]] = {k: [] for k in picks}
    lines: list[int] = []
    replaced: list[int] = []
    unterminated = None
    for line in rows:
        n = line.number
        unterminated = None if line.terminated else n
        fields = line.text.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path} line {n}: expected {len(header)} tab-separated fields, found {len(fields)}"
                + truncation_hint(n, unterminated)
            )
        if line.bad_encoding:
            # Bad bytes in a column nobody reads do not matter; in a text column they are replaced.
            hit = [ours for ours, idx in picks.items() if idx is not None and _REPLACEMENT in fields[idx]]
            not_text = [ours for ours in hit if ours not in text_columns]
            if not_text:
                raise DataError(f"{path} line {n}: {not_text[0]} is not valid utf-8 ({line.bad_encoding})")
            if hit:
                replaced.append(n)
        for ours, idx in picks.items():
            cols[ours].append(fields[idx] if idx is not None else None)
        lines.append(n)
    if not lines:
        raise DataError(f"{path}: no data rows after the header")
    warn_replaced_text(path, replaced)
    schema = {k: pl.Utf8 for k in cols}
    frame = pl.DataFrame({**cols, "_line": lines}, schema={**schema, "_line": pl.Int64})
    return TextRows(path, frame, unterminated)


# ----------------------------------------------------------------------------------------------- JSON lines

_POLARS_TYPES: dict[str, pl.DataType] = {
    "str": pl.Utf8(),
    "num": pl.Float64(),
    "int": pl.Int64(),
    "list": pl.List(pl.Utf8()),
}
CHUNK_BYTES = 64 << 20


def is_gzip(path: Path) -> bool:
    """Whether `path` is gzip-compressed: by its name, or by its first bytes (a gzip file under a plain
    name, log.csv or log.jsonl, was read as text)."""
    if path.name.lower().endswith(".gz"):
        return True
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_binary(path: Path) -> IO[bytes]:
    require_file(path)
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def read_jsonl(
    path: Path,
    fields: dict[str, str],
    required: tuple[str, ...],
    keep: pl.Series | None = None,
    text: Iterable[str] = (),
) -> pl.DataFrame:
    """Read `fields` (name -> "str" | "num" | "int" | "list") of every record, plus `_line`.

    `keep`: only records whose first field is in this set are kept (metadata of reviewed items), so a
    multi-GB metadata file never sits in memory whole. Fields named in `text` follow the text-encoding
    policy; the others must be valid UTF-8.
    """
    schema = {k: _POLARS_TYPES[v] for k, v in fields.items()}
    key = next(iter(fields))
    text_fields = frozenset(text)
    frames: list[pl.DataFrame] = []
    replaced: list[int] = []
    line_no = seen = done = 0
    require_file(path)
    size = path.stat().st_size
    raw = open(path, "rb")  # noqa: SIM115 - closed below; its position measures progress
    try:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if is_gzip(path) else raw
        with progress.task(f"reading {path.name}", total=size) as bar:
            while chunk := stream.readlines(CHUNK_BYTES):
                numbers, lines = [], []
                for line in chunk:
                    line_no += 1
                    if line_no == 1:
                        line = without_bom(line)
                    if line.strip():
                        numbers.append(line_no)
                        lines.append(line if line.endswith(b"\n") else line + b"\n")
                if not lines:
                    continue
                if not chunk[-1].endswith(b"\n") and numbers[-1] == line_no:
                    # The file's last line has no newline: if it is no record either, the file was cut.
                    try:
                        parse_record(lines[-1], path, line_no)
                    except DataError as e:
                        raise DataError(f"{e}{truncation_hint(line_no, line_no)}") from None
                df, chunk_replaced = _parse_chunk(path, numbers, lines, fields, schema, text_fields)
                seen += df.height
                for col in required:
                    missing = df[col].is_null()
                    if missing.any():
                        raise DataError(
                            f"{path} line {df['_line'][missing.arg_max()]}: missing field {col!r}"
                        )
                if keep is not None:
                    df = df.filter(pl.col(key).str.strip_chars().is_in(keep.implode()))
                if chunk_replaced:  # only lines that reach the data count
                    replaced += df["_line"].filter(df["_line"].is_in(chunk_replaced)).to_list()
                frames.append(df)
                bar.advance(raw.tell() - done)  # compressed bytes for .gz: the bar tracks the file on disk
                done = raw.tell()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz, unreadable file
        raise DataError(f"{path}: cannot read the file ({e})") from None
    finally:
        raw.close()
    if not seen:
        raise DataError(f"{path}: file is empty")
    warn_replaced_text(path, replaced)
    out = pl.concat(frames)
    if keep is not None:
        log.info("%s: %d of %d records are for reviewed items", path, out.height, seen)
    return out


def _parse_chunk(
    path: Path,
    numbers: list[int],
    lines: list[bytes],
    fields: dict[str, str],
    schema: dict[str, pl.DataType],
    text: frozenset[str],
) -> tuple[pl.DataFrame, list[int]]:
    """The chunk's records, and the lines whose text fields had bytes replaced.

    Fast path: polars reads the whole chunk. It refuses invalid UTF-8 or a malformed record; then the
    chunk is read again one record at a time, which applies the text-encoding policy and names the bad
    line in any error.
    """
    df, replaced = _fast(lines, schema), []
    if df is None:
        # Python's json.dumps writes NaN and Infinity, which polars refuses: only the lines holding them
        # take the careful path (a chunk of such lines one at a time was ~8x slower), unless the rest fails
        odd = np.array([b"NaN" in line or b"Infinity" in line for line in lines], dtype=bool)
        rest = _fast([ln for ln, o in zip(lines, odd, strict=True) if not o], schema) if odd.any() else None
        if rest is None:
            df, replaced = _parse_lines(path, zip(numbers, lines, strict=True), fields, schema, text)
        else:
            where = np.flatnonzero(odd)
            careful, replaced = _parse_lines(
                path, ((numbers[i], lines[i]) for i in where), fields, schema, text
            )
            order = np.concatenate([np.flatnonzero(~odd), where]).argsort(kind="stable")
            df = pl.concat([rest, careful])[order]
    return df.with_columns(_line=pl.Series(numbers, dtype=pl.Int64)), replaced


def _fast(lines: list[bytes], schema: dict[str, pl.DataType]) -> pl.DataFrame | None:
    """polars' read of whole records (None where it refuses one: invalid UTF-8, a malformed record, NaN)."""
    try:
        df = pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=schema)
    except Exception:
        return None
    return df if df.height == len(lines) else None  # never seen; would break the line numbers


def _parse_lines(
    path: Path,
    numbered: Iterable[tuple[int, bytes]],
    fields: dict[str, str],
    schema: dict[str, pl.DataType],
    text: frozenset[str],
) -> tuple[pl.DataFrame, list[int]]:
    """`_parse_chunk`'s careful path: one record at a time, applying the text-encoding policy."""
    cols: dict[str, list[Any]] = {k: [] for k in fields}
    replaced: list[int] = []
    as_json: dict[str, list[int]] = {}  # text fields holding another JSON value: positions, written below
    for n, line in numbered:
        try:
            decoded, bad = line.decode("utf-8"), None
        except UnicodeDecodeError as e:
            decoded, bad = line.decode("utf-8", errors="replace"), e.reason
        record = parse_record(decoded, path, n)
        values = {k: coerce(record.get(k), kind, path, n, k) for k, kind in fields.items()}
        # Only a line with bad bytes can hold replacement characters that were not in the file.
        if bad and (hit := [k for k, v in values.items() if _has_replacement(v)]):
            not_text = [k for k in hit if k not in text]
            if not_text:
                raise DataError(f"{path} line {n}: field {not_text[0]!r} is not valid utf-8 ({bad})")
            replaced.append(n)
        for k, v in values.items():
            if fields[k] == "str" and v is not None and not isinstance(v, str):
                as_json.setdefault(k, []).append(len(cols[k]))
            cols[k].append(v)
    for k, where in as_json.items():
        for i, written in zip(where, _as_polars_text([cols[k][i] for i in where]), strict=True):
            cols[k][i] = written
    return pl.DataFrame(cols, schema=schema), replaced


def _as_polars_text(values: list[Any]) -> list[str]:
    """JSON values (numbers, booleans, ...) as the text the fast path's polars writes for them in a text
    column (1.0 as "1", 1e-7 as "0.0000001"): an id must read the same whichever path read its chunk."""
    lines = b"\n".join(json.dumps({"v": v}).encode() for v in values)
    return pl.read_ndjson(io.BytesIO(lines), schema={"v": pl.Utf8})["v"].to_list()


def _has_replacement(value: Any) -> bool:
    if isinstance(value, list):
        return any(_REPLACEMENT in x for x in value)
    return isinstance(value, str) and _REPLACEMENT in value


def parse_record(line: str | bytes, path: Path, n: int) -> dict[str, Any]:
    """One JSON object (or python-literal dict) from a line."""
    try:
        record = json.loads(line)
    except ValueError:
        # Some Amazon 2018 metadata files hold python literals ({'asin': ...}) rather than JSON.
        text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        try:
            record = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(
                f"{path} line {n}: not a JSON object: {line[:80]!r}{_array_hint(line, n)}"
            ) from None
    if not isinstance(record, dict):
        said = f"{path} line {n}: expected a JSON object, found {type(record).__name__}"
        raise DataError(said + _array_hint(line, n))
    return record


def _array_hint(line: str | bytes, n: int) -> str:
    """A file opening with `[` is one JSON array (pandas' to_json(orient='records') without lines=True), not
    JSON lines."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    if n != 1 or not text.lstrip().startswith("["):
        return ""
    return (
        "; the file looks like one JSON array, and JSON lines hold one object per line: write it so (pandas: "
        "to_json(orient='records', lines=True))"
    )


def coerce(value: Any, kind: str, path: Path, n: int, field: str) -> Any:
    """One JSON value as the column kind, accepting the harmless variants seen in real files."""
    if value is None:
        return None
    if kind == "list":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [x if isinstance(x, str) else json.dumps(x) for x in value if x is not None]
    elif kind == "str":
        if isinstance(value, float) and not math.isfinite(value):
            # Python's json.dumps writes a float NaN (a gap in a float column) and Infinity as such, which
            # polars refuses to read back: NaN is a gap, Infinity its own text (a rating's check names it)
            return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        # Any other JSON value becomes text as polars writes it (`_parse_lines` converts them together).
        return value
    elif isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None and kind == "num":
            return number
        if number is not None and number.is_integer() and abs(number) < 2**63:
            return value if isinstance(value, int) else int(number)
    what = {"list": "a list or text", "str": "text", "num": "a number", "int": "a whole number"}[kind]
    raise DataError(f"{path} line {n}: field {field!r} should be {what}, found {value!r}"[:300])
