"""Readers for each supported source format, and `load_dataset`, which picks one from a `DataConfig`.

Every reader returns a validated `InteractionData`. Bad input raises `DataError` naming the file, the 1-based
line (counting the header where there is one) and the problem. Nothing is dropped silently: duplicates and
filtered rows are logged on the `evolora.data` logger with a count.

Text files are split in Python (exact line numbers for errors, ~1 s per million lines) and converted to
numbers column-wise by polars. JSON-lines files are read in chunks of ~64 MB: polars parses each chunk, and
a chunk polars rejects is parsed again line by line, which finds the bad line for the error message and also
accepts the python-literal lines (`{'asin': ...}`) of some Amazon 2018 metadata files. So several-GB files
stream through with only the kept columns in memory.
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import polars as pl

from evolora import progress
from evolora.config import DataConfig
from evolora.data.fetch import fetch, registered_datasets
from evolora.data.filters import kcore, keep_recent
from evolora.data.schema import ITEM_OPTIONAL, InteractionData, sort_interactions
from evolora.errors import DataError
from evolora.io import read_json

log = logging.getLogger("evolora.data")

# All supported sources rate on 1..5 stars; rating > 3 is a like (TALLRec, LSAT).
LIKE_THRESHOLD = 3.0

# Column order of the 19 genre flags in GroupLens u.item (from its u.genre file).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_YEAR_IN_TITLE = r"\((\d{4})\)(?:\s*\([^)]*\))?\s*$"  # "Toy Story (1995)", also "... (1995) (V)"
_YEAR_IN_DATE = r"\b(1[89]\d\d|20\d\d)\b"
_ENTITY = re.compile(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


# ----------------------------------------------------------------------------------------------- MovieLens


def load_movielens_100k(folder: str | Path) -> InteractionData:
    """GroupLens MovieLens-100K: `u.data` (user, item, rating, timestamp; tab-separated) and `u.item`
    (pipe-separated, latin-1: id, "Toy Story (1995)", release date, video date, URL, 19 genre flags)."""
    folder = Path(folder)
    inter_file, item_file = folder / "u.data", folder / "u.item"
    inter = _read_delimited(inter_file, "\t", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
    raw = _read_delimited(
        item_file, "|", ["item_id", "title", "date", "video_date", "url", *ML100K_GENRES], "latin-1"
    )
    flags = [pl.when(pl.col(g).str.strip_chars() == "1").then(pl.lit(g)) for g in ML100K_GENRES]
    items = raw.select(
        "item_id",
        "title",
        "_line",
        genre=_join_or_null(pl.concat_list(flags).list.drop_nulls(), ", "),
        # Release dates look like "01-Jan-1995"; the year is their last four characters.
        year=pl.col("date").str.extract(r"(\d{4})\s*$"),
    )
    return _finish("ml-100k", folder, inter, inter_file, items, item_file, strict=True)


def load_movielens_100k_atomic(path: str | Path) -> InteractionData:
    """RecBole atomic files (`<name>.inter`, `<name>.item`: tab-separated, header `field:type`), as shipped in
    RecBole's own ml-100k example. `path` is the folder or the `.inter` file.

    Titles come out as in GroupLens' u.item ("Toy Story (1995)"): RecBole split the year off the title into
    `release_year`, so it is put back. Genres come from `class` (space-separated; no ML genre has a space).
    """
    path = Path(path)
    if path.suffix == ".inter":
        inter_file = path
    else:
        found = sorted(path.glob("*.inter")) if path.is_dir() else []
        if len(found) != 1:
            what = "no" if not found else "more than one"
            raise DataError(f"{path}: {what} RecBole .inter file found (pass the .inter file itself)")
        inter_file = found[0]
    item_file = inter_file.with_suffix(".item")
    inter = _read_atomic(inter_file, {c: (c,) for c in ("user_id", "item_id", "rating", "timestamp")})
    raw = _read_atomic(
        item_file,
        {"item_id": ("item_id",), "title": ("movie_title", "title")},
        {"release_year": ("release_year", "year"), "class": ("class", "genre")},
    )
    # RecBole's copy misspells item 267's "unknown" title and year; GroupLens has title "unknown", no date.
    unknown = pl.col("title") == "unkonwn"
    release = pl.when(unknown).then(None).otherwise(pl.col("release_year").str.strip_chars())
    title = pl.when(unknown).then(pl.lit("unknown")).otherwise(pl.col("title"))
    # Non-year values are kept in the title too: "Land Before Time III ... (1995)" + "V" is GroupLens'
    # "Land Before Time III ... (1995) (V)".
    title = pl.when(release.is_null() | (release == "")).then(title).otherwise(title + " (" + release + ")")
    items = raw.select(
        "item_id", "_line", title=title, genre=_join_or_null(pl.col("class").str.split(" "), ", ")
    )
    items = items.with_columns(year=pl.col("title").str.extract(_YEAR_IN_TITLE))
    return _finish(inter_file.stem, inter_file.parent, inter, inter_file, items, item_file, strict=True)


def load_movielens_1m(folder: str | Path) -> InteractionData:
    """GroupLens MovieLens-1M: `ratings.dat` (UserID::MovieID::Rating::Timestamp) and `movies.dat`
    (MovieID::Title::Genres, latin-1; genres `A|B` become "A, B", the year comes from the title)."""
    folder = Path(folder)
    inter_file, item_file = folder / "ratings.dat", folder / "movies.dat"
    inter = _read_delimited(inter_file, "::", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
    raw = _read_delimited(item_file, "::", ["item_id", "title", "genres"], "latin-1")
    items = raw.select(
        "item_id",
        "title",
        "_line",
        genre=_join_or_null(pl.col("genres").str.split("|"), ", "),
        year=pl.col("title").str.extract(_YEAR_IN_TITLE),
    )
    return _finish("ml-1m", folder, inter, inter_file, items, item_file, strict=True)


# -------------------------------------------------------------------------------------------------- Amazon


def load_amazon_2018(reviews_path: str | Path, meta_path: str | Path) -> InteractionData:
    """Amazon Review Data 2018 (Ni et al., EMNLP'19): reviews JSON lines (`reviewerID`, `asin`, `overall`,
    `unixReviewTime`) and metadata lines (`asin`, `title`, `category` list, `description`, `date`), as JSON or
    as python literals; plain or .gz.

    Metadata repeated for one asin keeps its first record; exact duplicate reviews are dropped; reviewed items
    missing from the metadata keep their reviews under the title "item <asin>". Each is logged with a count.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    fields = {"reviewerID": "str", "asin": "str", "overall": "num", "unixReviewTime": "int"}
    inter = _read_jsonl(reviews_path, fields, required=tuple(fields)).rename(
        {"reviewerID": "user_id", "asin": "item_id", "overall": "rating", "unixReviewTime": "timestamp"}
    )
    meta_fields = {"asin": "str", "title": "str", "category": "list", "description": "list", "date": "str"}
    meta = _read_jsonl(meta_path, meta_fields, required=("asin",), keep=_reviewed(inter))
    items = meta.select(
        pl.col("asin").alias("item_id"),
        "title",
        "_line",
        category=_join_or_null(pl.col("category"), " > "),
        description=_join_or_null(pl.col("description"), " "),
        year=pl.col("date").str.extract(_YEAR_IN_DATE),
    )
    return _finish(_stem(reviews_path), reviews_path, inter, reviews_path, items, meta_path, strict=False)


def load_amazon_2023(reviews_path: str | Path, meta_path: str | Path) -> InteractionData:
    """Amazon Reviews 2023 (Hou et al., 2024): reviews JSONL (`user_id`, `parent_asin`, `rating`,
    `timestamp` in milliseconds) and metadata JSONL (`parent_asin`, `title`, `main_category`, `categories`,
    `description`).

    Items are `parent_asin`s, as in the 2023 benchmark splits; timestamps become seconds. Duplicates and
    items missing from the metadata are handled as in `load_amazon_2018`.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    fields = {"user_id": "str", "parent_asin": "str", "rating": "num", "timestamp": "int"}
    inter = _read_jsonl(reviews_path, fields, required=tuple(fields))
    inter = inter.rename({"parent_asin": "item_id"}).with_columns(pl.col("timestamp") // 1000)
    meta_fields = {
        "parent_asin": "str",
        "title": "str",
        "main_category": "str",
        "categories": "list",
        "description": "list",
    }
    meta = _read_jsonl(meta_path, meta_fields, required=("parent_asin",), keep=_reviewed(inter))
    category = _join_or_null(pl.col("categories"), " > ")
    items = meta.select(
        pl.col("parent_asin").alias("item_id"),
        "title",
        "_line",
        category=pl.coalesce(category, pl.col("main_category")),
        description=_join_or_null(pl.col("description"), " "),
    )
    return _finish(_stem(reviews_path), reviews_path, inter, reviews_path, items, meta_path, strict=False)


# ---------------------------------------------------------------------------------------------------- PESO

_PESO_BLOCK = re.compile(r"^(?P<key>.+)\.all\.block_(?P<block>\d+)\.json$")
# Synthetic time: block b, position p (counted over the whole block in file order) -> b * 10**9 + p.
_PESO_BLOCK_SPAN = 10**9


def load_peso_blocks(folder: str | Path, key: str | None = None) -> InteractionData:
    """PESO's pre-blocked release (Yoo et al., ICLR'26; spec §1.2): `<key>.all.block_<b>.json` for b = 0..T-1,
    each `{user: {"previous_block": [items], "current_block": [items]}}`, and optionally the semantic-ID index
    `<key>.index.*.json` (`{item: ["<a_51>", "<b_218>", ...]}`).

    `folder` may also be one of the block files (which names the key). `key` picks a dataset when the folder
    holds several.

    * Interactions come from the `current_block` lists only; each `previous_block` must equal the user's
      earlier `current_block`s joined (the release satisfies this; anything else is another format).
    * The release has neither ratings nor times. Every interaction is implicit feedback: rating 5.0 and
      `like_threshold` 0.0, so every interaction is a like. Timestamps are synthetic,
      `block * 10**9 + position in the block`, so they keep block order and each user's order.
    * `preset_stages` = block + 1 (`staging.scheme: preset` uses them).
    * Items: `title` "item <id>" (there are no titles), `sid` = the index tokens joined. Items in the index
      that nobody interacted with stay in the table: they are valid decoding targets.
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        m = _PESO_BLOCK.match(folder.name)
        if not m:
            raise DataError(f"{folder}: not a PESO block file (<key>.all.block_<n>.json)")
        folder, key = folder.parent, key or m["key"]
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, dict[int, Path]] = {}
    for p in folder.iterdir():
        if m := _PESO_BLOCK.match(p.name):
            found.setdefault(m["key"], {})[int(m["block"])] = p
    if key is None:
        if len(found) != 1:
            what = "no PESO block files (<key>.all.block_<n>.json)" if not found else "several PESO datasets"
            raise DataError(
                f"{folder}: {what}; keys found: {sorted(found)}. Point data.source at one block file"
            )
        key = next(iter(found))
    if key not in found:
        raise DataError(f"{folder}: no block files for key {key!r}; keys found: {sorted(found)}")
    blocks = found[key]
    missing = sorted(set(range(max(blocks) + 1)) - set(blocks))
    if missing:
        raise DataError(f"{folder}: {key}.all.block_{missing[0]}.json is missing (blocks must run 0..T-1)")

    users: list[str] = []
    items: list[str] = []
    stages: list[int] = []
    timestamps: list[int] = []
    history: dict[str, list[str]] = {}
    for b in range(len(blocks)):
        path = blocks[b]
        position = 0
        for user, prev, curr in _peso_block_records(path):
            earlier = history.setdefault(user, [])
            if prev != earlier:
                common = min(len(prev), len(earlier))
                i = next((i for i in range(common) if prev[i] != earlier[i]), common)
                raise DataError(
                    f"{path}: user {user!r}: previous_block ({len(prev)} items) is not the user's earlier "
                    f"current_blocks joined ({len(earlier)} items); they differ at position {i}. Not PESO's "
                    "pre-blocked format"
                )
            earlier.extend(curr)
            n = len(curr)
            users += [user] * n
            items += curr
            stages += [b + 1] * n
            timestamps += range(b * _PESO_BLOCK_SPAN + position, b * _PESO_BLOCK_SPAN + position + n)
            position += n
        if position >= _PESO_BLOCK_SPAN:
            raise DataError(f"{path}: more than {_PESO_BLOCK_SPAN} interactions in one block")
    inter = pl.DataFrame(
        {"user_id": users, "item_id": items, "rating": [5.0] * len(users), "timestamp": timestamps},
        schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "rating": pl.Float64, "timestamp": pl.Int64},
    )

    table = pl.DataFrame({"item_id": inter["item_id"].unique(maintain_order=True)})
    indexes = sorted(
        p for p in folder.iterdir() if p.name.startswith(f"{key}.index.") and p.suffix == ".json"
    )
    if len(indexes) > 1:
        raise DataError(f"{folder}: several semantic-ID indexes for {key}: {[p.name for p in indexes]}")
    if indexes:
        sids = _peso_index(indexes[0])
        # Index order first (it holds every item), then interacted items the index lacks.
        table = pl.concat([sids.select("item_id"), table.join(sids, on="item_id", how="anti")])
        table = table.join(sids, on="item_id", how="left", maintain_order="left")
        unindexed = inter.join(sids, on="item_id", how="anti")["item_id"].n_unique()
        if unindexed:
            log.warning("%s: %d interacted items have no semantic ID", indexes[0], unindexed)
    else:
        log.info("%s: no semantic-ID index (%s.index.*.json); items get no sid", folder, key)
    log.info("%s: PESO blocks carry no item titles; items are called 'item <id>'", folder)
    table = table.with_columns(title=pl.lit("item ") + pl.col("item_id")).select(
        "item_id", "title", *(["sid"] if indexes else [])
    )
    data = InteractionData(
        name=key,
        interactions=inter,
        items=table,
        like_threshold=0.0,
        source=str(folder),
        preset_stages=np.asarray(stages, dtype=np.int32),
    )
    return data.validate()


def _peso_block_records(path: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """(user, previous_block, current_block) per user, in file order, with ids as strings."""
    try:
        with open(path, "rb") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the JSON file ({e})"[:400]) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object of users, found {type(raw).__name__}")
    for user, record in raw.items():
        lists = []
        for field in ("previous_block", "current_block"):
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, list) or not all(isinstance(x, str | int) for x in value):
                raise DataError(
                    f"{path}: user {user!r}: {field} should be a list of item ids, found {value!r}"[:300]
                )
            lists.append([str(x) for x in value])
        yield user, lists[0], lists[1]


def _peso_index(path: Path) -> pl.DataFrame:
    """`item_id`, `sid` from a PESO index file (`{item: ["<a_51>", "<b_218>", ...]}`)."""
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the JSON file ({e})"[:400]) from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object of items, found {type(raw).__name__}")
    for item, tokens in raw.items():
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise DataError(
                f"{path}: item {item!r}: expected a list of token strings, found {tokens!r}"[:300]
            )
    return pl.DataFrame(
        {"item_id": list(raw), "sid": ["".join(t) for t in raw.values()]},
        schema={"item_id": pl.Utf8, "sid": pl.Utf8},
    )


# --------------------------------------------------------------------------------------------- load_dataset

Format = Literal["ml-100k", "ml-100k-atomic", "ml-1m", "amazon-2018", "amazon-2023", "peso"]


def load_dataset(cfg: DataConfig) -> InteractionData:
    """Load `cfg.source` (a registered name, fetched and cached, or a path), then apply the like threshold,
    `max_interactions` (most recent N) and the k-core, in that order."""
    path = Path(cfg.source).expanduser()
    name = None
    if not path.exists():
        if cfg.source not in registered_datasets():
            raise DataError(
                f"data.source: {cfg.source!r} is neither an existing path nor a registered dataset "
                f"({', '.join(registered_datasets())})"
            )
        name, path = cfg.source, fetch(cfg.source)
    # A fetched folder holds whichever files its route brought (GroupLens or RecBole), so always detect.
    fmt, path, meta = _resolve(path, "auto" if name else cfg.format, cfg.meta)
    data = _LOADERS[fmt](path, meta) if fmt.startswith("amazon") else _LOADERS[fmt](path)
    if name:
        data = replace(data, name=name)
    if cfg.like_threshold is not None:
        data = replace(data, like_threshold=cfg.like_threshold)
    if cfg.max_interactions is not None and data.interactions.height > cfg.max_interactions:
        n = cfg.max_interactions
        data = _filtered(
            data,
            lambda df: keep_recent(df, n),
            f"kept the most recent {n} of {data.interactions.height} interactions",
        )
    if cfg.kcore.user > 1 or cfg.kcore.item > 1:
        before = data.interactions.height
        data = _filtered(
            data,
            lambda df: kcore(df, cfg.kcore.user, cfg.kcore.item),
            f"k-core users>={cfg.kcore.user} items>={cfg.kcore.item}: kept {{kept}} of {before}",
        )
        if data.interactions.height == 0:
            raise DataError(
                f"{data.source}: the k-core (users >= {cfg.kcore.user}, items >= {cfg.kcore.item}) removes "
                "every interaction; lower data.kcore"
            )
    log.info(
        "%s: %d interactions, %d users, %d items",
        data.name,
        data.interactions.height,
        data.n_users,
        data.n_items,
    )
    return data.validate()


def _filtered(data: InteractionData, keep: Any, note: str) -> InteractionData:
    """Apply a row filter (`keep(df) -> df`, dropping rows but never reordering them) to the interactions,
    carrying the preset stages along in a temporary column so they stay aligned."""
    df = data.interactions
    if data.preset_stages is not None:
        df = df.with_columns(_preset=pl.Series(data.preset_stages, dtype=pl.Int32))
    out = keep(df)
    preset = out["_preset"].to_numpy() if "_preset" in out.columns else None
    return data.with_interactions(out.drop("_preset", strict=False), note.format(kept=out.height), preset)


def detect_format(path: str | Path) -> Format:
    """Guess the format of a file or folder from file names (and, for Amazon, the first line's fields)."""
    return _resolve(Path(path), "auto", None)[0]


def _resolve(path: Path, fmt: str, meta: str | None) -> tuple[Format, Path, Path | None]:
    """(format, path for the loader, Amazon metadata file)."""
    if fmt in ("ml-100k", "ml-1m"):
        return fmt, (path.parent if path.is_file() else path), None  # type: ignore[return-value]
    if fmt in ("ml-100k-atomic", "peso"):
        return fmt, path, None  # type: ignore[return-value]
    if fmt == "auto":
        names = {p.name for p in path.iterdir()} if path.is_dir() else {path.name}
        if any(_PESO_BLOCK.match(n) for n in names) and (
            path.is_file() or any(n.endswith(".all.block_0.json") for n in names)
        ):
            return "peso", path, None
        if "u.data" in names:
            return "ml-100k", (path if path.is_dir() else path.parent), None
        if any(n.endswith(".inter") for n in names):
            return "ml-100k-atomic", path, None
        if "ratings.dat" in names:
            return "ml-1m", (path if path.is_dir() else path.parent), None
    # Amazon: a reviews file (metadata from data.meta) or a folder holding one reviews and one metadata file.
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith(_JSON_SUFFIXES))
        if not files and fmt == "auto":
            raise DataError(
                f"{path}: no data files found; expected u.data (MovieLens-100K), *.inter (RecBole), "
                "ratings.dat (MovieLens-1M), Amazon .json/.jsonl(.gz) reviews and metadata, or PESO blocks "
                "(<key>.all.block_0.json)"
            )
        metas = [p for p in files if p.name.lower().startswith("meta")]
        reviews = [p for p in files if p not in metas]
        if meta is not None:
            metas = [Path(meta)]
        if len(reviews) != 1 or len(metas) != 1:
            raise DataError(
                f"{path}: cannot tell which files to load. Expected one reviews file and one metadata file "
                f"(named meta*) among .json/.jsonl(.gz) files; found reviews {[p.name for p in reviews]}, "
                f"metadata {[p.name for p in metas]}. Point data.source at the reviews file and data.meta at "
                "the metadata file"
            )
        path, meta_path = reviews[0], metas[0]
    else:
        if fmt == "auto" and not path.name.lower().endswith(_JSON_SUFFIXES):
            raise DataError(
                f"{path}: cannot guess the format from the file name; expected u.data, *.inter, ratings.dat, "
                "or Amazon .json/.jsonl(.gz) files. Set data.format"
            )
        if meta is None:
            raise DataError(f"{path}: Amazon reviews need their metadata file: set data.meta (or --meta)")
        meta_path = Path(meta).expanduser()
    if fmt == "auto":
        fmt = _amazon_version(path)
    return fmt, path, meta_path  # type: ignore[return-value]


def _amazon_version(path: Path) -> Format:
    """amazon-2018 or amazon-2023, from the field names of the first record."""
    try:
        with _open_binary(path) as f:
            n, first = next(((n, line) for n, line in enumerate(f, 1) if line.strip()), (0, b""))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None
    if not first:
        raise DataError(f"{path}: file is empty")
    record = _parse_record(first, path, n)
    if "reviewerID" in record or "unixReviewTime" in record:
        return "amazon-2018"
    if "parent_asin" in record and "user_id" in record:
        return "amazon-2023"
    if "title" in record:
        raise DataError(f"{path}: this looks like a metadata file; set data.source to the reviews file")
    raise DataError(
        f"{path}: unknown JSON format (first record has fields {sorted(record)[:10]}); expected Amazon 2018 "
        "reviews (reviewerID, asin, overall, unixReviewTime) or 2023 reviews (user_id, parent_asin, ...)"
    )


_LOADERS: dict[str, Any] = {
    "ml-100k": load_movielens_100k,
    "ml-100k-atomic": load_movielens_100k_atomic,
    "ml-1m": load_movielens_1m,
    "amazon-2018": load_amazon_2018,
    "amazon-2023": load_amazon_2023,
    "peso": load_peso_blocks,
}


# ------------------------------------------------------------------------------------------ shared building


def _finish(
    name: str,
    source: Path,
    inter: pl.DataFrame,
    inter_file: Path,
    items: pl.DataFrame,
    item_file: Path,
    strict: bool,
) -> InteractionData:
    """Check ids, fill titles, sort, validate.

    `inter` has string or typed columns plus `_line`; `items` has `item_id`, `title`, optional columns and
    `_line`. `strict` (curated MovieLens files): duplicate items and unknown items are errors. Otherwise
    (scraped Amazon files) duplicates keep their first record and unknown items get a fallback title.
    """
    inter = inter.with_columns(
        rating=_numeric(inter, "rating", pl.Float64, inter_file),
        timestamp=_numeric(inter, "timestamp", pl.Int64, inter_file),
        user_id=pl.col("user_id").cast(pl.Utf8).str.strip_chars(),
        item_id=pl.col("item_id").cast(pl.Utf8).str.strip_chars(),
    )
    items = items.with_columns(pl.col("item_id").cast(pl.Utf8).str.strip_chars())
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

    if not strict:
        before = inter.height
        inter = inter.unique(["user_id", "item_id", "timestamp", "rating"], keep="first", maintain_order=True)
        if inter.height < before:
            log.warning("%s: %d exact duplicate reviews removed", inter_file, before - inter.height)

    # Titles: strip, unescape HTML entities, and name untitled items explicitly instead of dropping them.
    titles = items["title"].cast(pl.Utf8).str.strip_chars()
    if titles.str.contains("&", literal=True).any():
        titles = pl.Series([_unescape(t) if t and "&" in t else t for t in titles], dtype=pl.Utf8)
    items = items.with_columns(title=titles)
    untitled = items["title"].is_null() | (items["title"] == "")
    if untitled.any():
        log.warning("%s: %d items have no title; they are called 'item <id>'", item_file, int(untitled.sum()))
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
    data = InteractionData(
        name=name,
        interactions=sort_interactions(inter),
        items=items,
        like_threshold=LIKE_THRESHOLD,
        source=str(source),
    )
    return data.validate()


def _numeric(df: pl.DataFrame, col: str, dtype: pl.DataType, path: Path) -> pl.Series:
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
        raise DataError(f"{path} line {df['_line'][i]}: {col} {s[i]!r} is not a {kind}")
    return out.alias(col)


def _join_or_null(lists: pl.Expr, sep: str) -> pl.Expr:
    """Join a list column into one string; empty lists become null."""
    cleaned = (
        lists.list.eval(pl.element().str.strip_chars()).list.drop_nulls().list.filter(pl.element() != "")
    )
    return pl.when(cleaned.list.len() > 0).then(cleaned.list.join(sep))


def _unescape(text: str) -> str:
    # Only well-formed entities: a bare "&" (as in "Batman & Robin") must stay as it is.
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _reviewed(inter: pl.DataFrame) -> pl.Series:
    return inter["item_id"].cast(pl.Utf8).str.strip_chars().unique()


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (" (it is a folder)" if path.is_dir() else ""))


# ------------------------------------------------------------------------------------------------ text files


def _read_delimited(path: Path, sep: str, columns: list[str], encoding: str) -> pl.DataFrame:
    """A headerless delimited file with exactly `len(columns)` fields a line: string columns + `_line`."""
    cols: list[list[str]] = [[] for _ in columns]
    lines: list[int] = []
    for n, line in _text_lines(path, encoding):
        fields = line.split(sep)
        if len(fields) != len(columns):
            raise DataError(
                f"{path} line {n}: expected {len(columns)} fields separated by {sep!r}, found {len(fields)}"
            )
        for col, value in zip(cols, fields, strict=True):
            col.append(value)
        lines.append(n)
    if not lines:
        raise DataError(f"{path}: file is empty")
    return pl.DataFrame(
        {**dict(zip(columns, cols, strict=True)), "_line": lines}, schema_overrides={"_line": pl.Int64}
    )


def _read_atomic(
    path: Path, required: dict[str, tuple[str, ...]], optional: dict[str, tuple[str, ...]] | None = None
) -> pl.DataFrame:
    """A RecBole atomic file. `required`/`optional` map our column name to accepted header names."""
    rows = _text_lines(path, "utf-8")
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: file is empty")
    header = [h.split(":", 1)[0].strip() for h in first[1].split("\t")]
    picks: dict[str, int | None] = {}
    for ours, accepted in {**required, **(optional or {})}.items():
        idx = next((header.index(a) for a in accepted if a in header), None)
        if idx is None and ours in required:
            raise DataError(f"{path} line {first[0]}: missing column {accepted[0]!r} (header has {header})")
        picks[ours] = idx
    cols: dict[str, list[str | None]] = {k: [] for k in picks}
    lines: list[int] = []
    for n, line in rows:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path} line {n}: expected {len(header)} tab-separated fields, found {len(fields)}"
            )
        for ours, idx in picks.items():
            cols[ours].append(fields[idx] if idx is not None else None)
        lines.append(n)
    if not lines:
        raise DataError(f"{path}: no data rows after the header")
    schema = {k: pl.Utf8 for k in cols}
    return pl.DataFrame({**cols, "_line": lines}, schema={**schema, "_line": pl.Int64})


def _text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for each non-blank line."""
    _require_file(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {n}: not valid {encoding} text ({e.reason})") from None
            if line.strip():
                yield n, line


# ----------------------------------------------------------------------------------------------- JSON lines

_POLARS_TYPES: dict[str, pl.DataType] = {
    "str": pl.Utf8(),
    "num": pl.Float64(),
    "int": pl.Int64(),
    "list": pl.List(pl.Utf8()),
}
_CHUNK_BYTES = 64 << 20


def _open_binary(path: Path) -> IO[bytes]:
    _require_file(path)
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_jsonl(
    path: Path,
    fields: dict[str, str],
    required: tuple[str, ...],
    keep: pl.Series | None = None,
) -> pl.DataFrame:
    """Read `fields` (name -> "str" | "num" | "int" | "list") of every record, plus `_line`.

    `keep`: only records whose first field is in this set are kept (metadata of reviewed items), so a
    multi-GB metadata file never sits in memory whole.
    """
    schema = {k: _POLARS_TYPES[v] for k, v in fields.items()}
    key = next(iter(fields))
    frames: list[pl.DataFrame] = []
    line_no = seen = done = 0
    _require_file(path)
    size = path.stat().st_size
    raw = open(path, "rb")  # noqa: SIM115 - closed below; its position measures progress
    try:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        with progress.task(f"reading {path.name}", total=size) as bar:
            while chunk := stream.readlines(_CHUNK_BYTES):
                numbers, lines = [], []
                for line in chunk:
                    line_no += 1
                    if line.strip():
                        numbers.append(line_no)
                        lines.append(line if line.endswith(b"\n") else line + b"\n")
                if not lines:
                    continue
                df = _parse_chunk(path, numbers, lines, fields, schema)
                seen += df.height
                for col in required:
                    missing = df[col].is_null()
                    if missing.any():
                        raise DataError(
                            f"{path} line {df['_line'][missing.arg_max()]}: missing field {col!r}"
                        )
                if keep is not None:
                    df = df.filter(pl.col(key).str.strip_chars().is_in(keep.implode()))
                frames.append(df)
                bar.advance(raw.tell() - done)  # compressed bytes for .gz: the bar tracks the file on disk
                done = raw.tell()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz, unreadable file
        raise DataError(f"{path}: cannot read the file ({e})") from None
    finally:
        raw.close()
    if not seen:
        raise DataError(f"{path}: file is empty")
    out = pl.concat(frames)
    if keep is not None:
        log.info("%s: %d of %d records are for reviewed items", path, out.height, seen)
    return out


def _parse_chunk(
    path: Path, numbers: list[int], lines: list[bytes], fields: dict[str, str], schema: dict[str, pl.DataType]
) -> pl.DataFrame:
    try:
        df = pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=schema)
        if df.height != len(lines):  # never seen; would break the line numbers, so take the careful path
            raise ValueError("row count mismatch")
    except Exception:  # polars rejects the chunk: redo it line by line, to name the bad line in the error
        cols: dict[str, list[Any]] = {k: [] for k in fields}
        for n, line in zip(numbers, lines, strict=True):
            record = _parse_record(line, path, n)
            for k, kind in fields.items():
                cols[k].append(_coerce(record.get(k), kind, path, n, k))
        df = pl.DataFrame(cols, schema=schema)
    return df.with_columns(_line=pl.Series(numbers, dtype=pl.Int64))


def _parse_record(line: bytes, path: Path, n: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        # Some Amazon 2018 metadata files hold python literals ({'asin': ...}) rather than JSON.
        try:
            record = ast.literal_eval(line.decode("utf-8", errors="replace").strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(f"{path} line {n}: not a JSON object: {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} line {n}: expected a JSON object, found {type(record).__name__}")
    return record


def _coerce(value: Any, kind: str, path: Path, n: int, field: str) -> Any:
    """One JSON value as the column kind, accepting the harmless variants seen in real files."""
    if value is None:
        return None
    if kind == "list":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [x if isinstance(x, str) else json.dumps(x) for x in value if x is not None]
    elif kind == "str":
        # As polars does: any other JSON value becomes its JSON text.
        return value if isinstance(value, str) else json.dumps(value)
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
