"""Amazon reviews: the 2018 release (Ni et al., EMNLP'19) and the 2023 release (Hou et al., 2024).

Each dataset is a reviews file and a metadata file, JSON lines, plain or .gz. `data.source` is the reviews
file (with `data.meta`) or a folder holding one reviews file and one metadata file named `meta*`. Which
release it is comes from the field names of the first review.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from pathlib import Path

import polars as pl

from evolora.data.build import check_calendar, finish, join_or_null
from evolora.data.readers import open_binary, parse_record, read_jsonl, without_bom
from evolora.data.schema import InteractionData
from evolora.data.times import SECONDS_PER_YEAR, day
from evolora.errors import DataError

log = logging.getLogger("evolora.data")

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")

_YEAR_IN_DATE = r"\b(1[89]\d\d|20\d\d)\b"


def load_amazon_2018(reviews_path: str | Path, meta_path: str | Path) -> InteractionData:
    """Amazon Review Data 2018 (Ni et al., EMNLP'19): reviews JSON lines (`reviewerID`, `asin`, `overall`,
    `unixReviewTime`) and metadata lines (`asin`, `title`, `category` list, `description`, `date`), as JSON or
    as python literals; plain or .gz.

    Metadata repeated for one asin keeps its first record; exact duplicate reviews are dropped; reviewed items
    missing from the metadata keep their reviews under the title "item <asin>". Each is logged with a count.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    _refuse_other_release(reviews_path, 2018)
    fields = {"reviewerID": "str", "asin": "str", "overall": "num", "unixReviewTime": "int"}
    inter = read_jsonl(reviews_path, fields, required=tuple(fields)).rename(
        {"reviewerID": "user_id", "asin": "item_id", "overall": "rating", "unixReviewTime": "timestamp"}
    )
    meta_fields = {"asin": "str", "title": "str", "category": "list", "description": "list", "date": "str"}
    text = ("title", "category", "description", "date")
    meta = read_jsonl(meta_path, meta_fields, required=("asin",), keep=_reviewed(inter), text=text)
    items = meta.select(
        pl.col("asin").alias("item_id"),
        "title",
        "_line",
        category=join_or_null(pl.col("category"), " > "),
        description=join_or_null(pl.col("description"), " "),
        year=pl.col("date").str.extract(_YEAR_IN_DATE),
    )
    return _finish_reviews(reviews_path, inter, items, meta_path)


def load_amazon_2023(reviews_path: str | Path, meta_path: str | Path) -> InteractionData:
    """Amazon Reviews 2023 (Hou et al., 2024): reviews JSONL (`user_id`, `parent_asin`, `rating`,
    `timestamp` in milliseconds) and metadata JSONL (`parent_asin`, `title`, `main_category`, `categories`,
    `description`).

    Items are `parent_asin`s, as in the 2023 benchmark splits; timestamps become seconds. Duplicates and
    items missing from the metadata are handled as in `load_amazon_2018`.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    _refuse_other_release(reviews_path, 2023)
    fields = {"user_id": "str", "parent_asin": "str", "rating": "num", "timestamp": "int"}
    inter = read_jsonl(reviews_path, fields, required=tuple(fields))
    latest = inter["timestamp"].max()
    if isinstance(latest, int) and 0 <= latest < 1000 * SECONDS_PER_YEAR and latest >= SECONDS_PER_YEAR:
        log.warning(
            "%s: every timestamp falls in 1970 as epoch milliseconds (the 2023 release's unit); these look "
            "like epoch seconds: multiply them by 1000 for the times to be right", reviews_path,
        )  # fmt: skip
    _refuse_mixed_units(reviews_path, inter)
    check_calendar(inter, reviews_path, "line", "ms")  # on the file's own numbers, before they become seconds
    inter = inter.rename({"parent_asin": "item_id"}).with_columns(pl.col("timestamp") // 1000)
    meta_fields = {
        "parent_asin": "str",
        "title": "str",
        "main_category": "str",
        "categories": "list",
        "description": "list",
    }
    text = ("title", "main_category", "categories", "description")
    meta = read_jsonl(meta_path, meta_fields, required=("parent_asin",), keep=_reviewed(inter), text=text)
    category = join_or_null(pl.col("categories"), " > ")
    items = meta.select(
        pl.col("parent_asin").alias("item_id"),
        "title",
        "_line",
        category=pl.coalesce(category, pl.col("main_category")),
        description=join_or_null(pl.col("description"), " "),
    )
    return _finish_reviews(reviews_path, inter, items, meta_path)


def _refuse_other_release(path: Path, release: int) -> None:
    """A `data.format` naming the other release gets that said, not a missing field on line 1."""
    try:
        found = version(path)
    except DataError:
        return  # not clearly either release: the reader's own line-by-line errors say more
    if found != release:
        raise DataError(
            f"{path}: these are Amazon {found} reviews, not {release}'s; set data.format: amazon-{found} "
            "(or auto)"
        )


def _refuse_mixed_units(path: Path, inter: pl.DataFrame) -> None:
    """Times in 1970 beside times decades later, as milliseconds: some reviews' timestamps in seconds (an
    edited or merged file); no review log spans that, and staging by time would put those reviews first."""
    ms = inter["timestamp"]
    early, late = ms < 1000 * SECONDS_PER_YEAR, ms >= 20_000 * SECONDS_PER_YEAR
    if early.any() and late.any():
        i, j = int(early.arg_max()), int(late.arg_max())  # type: ignore[arg-type]
        raise DataError(
            f"{path} line {inter['_line'][i]}: timestamp {ms[i]} is {day(ms[i] // 1000)} in epoch "
            f"milliseconds (the 2023 release's unit) but line {inter['_line'][j]}'s {ms[j]} is "
            f"{day(ms[j] // 1000)}: the file mixes seconds and milliseconds; give every timestamp in "
            "milliseconds"
        )


def _finish_reviews(
    reviews_path: Path, inter: pl.DataFrame, items: pl.DataFrame, meta_path: Path
) -> InteractionData:
    """Both versions end alike: duplicates removed and items without metadata counted (not strict)."""
    return finish(
        _stem(reviews_path),
        reviews_path,
        inter,
        reviews_path,
        items,
        meta_path,
        strict=False,
        rows_are="reviews",
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _reviewed(inter: pl.DataFrame) -> pl.Series:
    return inter["item_id"].cast(pl.Utf8).str.strip_chars().unique()


# ------------------------------------------------------------------------------------------ registry hooks


def resolve(path: Path, meta: str | None) -> tuple[Path, Path]:
    """(reviews file, metadata file) from `data.source` and `data.meta`."""
    if not path.is_dir():
        if meta is None:
            raise DataError(
                f"{path}: Amazon reviews need their metadata file: set data.meta (`--set data.meta=FILE`; "
                "--meta in `evolora data info`)"
            )
        return path, Path(meta).expanduser()
    reviews, metas = _folder_files(path, meta)
    if len(reviews) != 1 or len(metas) != 1:
        raise DataError(
            f"{path}: cannot tell which files to load. Expected one reviews file and one metadata file "
            f"(named meta*) among .json/.jsonl(.gz) files; found reviews {[p.name for p in reviews]}, "
            f"metadata {[p.name for p in metas]}. Point data.source at the reviews file and data.meta at "
            "the metadata file"
        )
    return reviews[0], metas[0]


def _folder_files(folder: Path, meta: str | None) -> tuple[list[Path], list[Path]]:
    """(the reviews files, the metadata files) a folder holds: its JSON files named meta* are metadata, or
    `meta` alone when given (a data.meta file inside the folder is the metadata, not a second reviews
    file)."""
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(JSON_SUFFIXES))
    metas = [p for p in files if p.name.lower().startswith("meta")]
    if meta is not None:
        metas = [Path(meta).expanduser()]
    given = {p.resolve() for p in metas}
    return [p for p in files if not p.name.lower().startswith("meta") and p.resolve() not in given], metas


def detects(release: int) -> Callable[[Path, str | None], bool]:
    """The registry's `detect` for one release: JSON files whose reviews are of that release."""

    def detect(path: Path, meta: str | None) -> bool:
        if not _json_files_present(path):
            return False
        if not path.is_dir():
            return version(path) == release
        try:
            reviews = resolve(path, meta)[0]
        except DataError:
            # Files that are no Amazon reviews at all (a log of one's own) get `version`'s message, which
            # says how to load them; Amazon files that do not pair up get `resolve`'s.
            reviews = _folder_files(path, meta)[0]
            if reviews:
                version(reviews[0])
            raise
        return version(reviews) == release

    return detect


def _json_files_present(path: Path) -> bool:
    if path.is_dir():
        return any(p.name.lower().endswith(JSON_SUFFIXES) for p in path.iterdir())
    return path.name.lower().endswith(JSON_SUFFIXES)


def version(path: Path) -> int:
    """2018 or 2023, from the field names of the first record of a reviews file."""
    try:
        with open_binary(path) as f:
            n, first = next(((n, line) for n, line in enumerate(f, 1) if line.strip()), (0, b""))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None
    if not first:
        raise DataError(f"{path}: file is empty")
    # A byte order mark opens some exported files; the reader skips it, so must this look at line 1.
    record = parse_record(without_bom(first).decode("utf-8", errors="replace"), path, n)
    if "reviewerID" in record or "unixReviewTime" in record:
        return 2018
    if "parent_asin" in record and "user_id" in record:
        return 2023
    if "title" in record:
        raise DataError(f"{path}: this looks like a metadata file; set data.source to the reviews file")
    raise DataError(
        f"{path}: unknown JSON format (first record has fields {sorted(record)[:10]}); expected Amazon 2018 "
        "reviews (reviewerID, asin, overall, unixReviewTime) or 2023 reviews (user_id, parent_asin, ...); "
        "for a log of your own, set data.format: table and data.columns"
    )
