"""Damaged and untidy files: truncated last lines, implausible timestamps, exact duplicate ratings, and the
text-encoding policy (text fields get U+FFFD and a warning; ids, ratings and timestamps must decode)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from datafiles import write_atomic, write_jsonl, write_ml100k

from evolora.data import load_amazon_2018, load_movielens_1m, load_movielens_100k, load_movielens_atomic
from evolora.errors import DataError

# Real-looking MovieLens times (1997-98); the last row is the one the tests cut off.
TIMED = [
    ("1", "1", 5, 881250949),
    ("2", "2", 3, 891717742),
    ("1", "2", 4, 878887116),
    ("2", "1", 2, 880606923),
    ("3", "3", 1, 876861799),
]
LOADERS = {"ml-100k": load_movielens_100k, "atomic": load_movielens_atomic, "ml-1m": load_movielens_1m}


def ratings_file(kind: str, folder: Path) -> tuple[Path, int]:
    """Write a dataset of `kind` with TIMED ratings; (its ratings file, line number of its first rating)."""
    if kind == "ml-100k":
        return write_ml100k(folder, ratings=TIMED) / "u.data", 1
    if kind == "atomic":
        return write_atomic(folder, ratings=TIMED) / "ml-100k.inter", 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "movies.dat").write_bytes(
        b"1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n3::X::Drama\n"
    )
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in TIMED))
    return folder / "ratings.dat", 1


def cut(path: Path, replace_last: str) -> None:
    """Replace the last line by `replace_last`, with no newline after it (a file cut off mid-line)."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + replace_last)


SEP = {"ml-100k": "\t", "atomic": "\t", "ml-1m": "::"}


@pytest.mark.parametrize("kind", LOADERS)
def test_cut_timestamp_on_the_last_line(tmp_path: Path, kind: str) -> None:
    path, first = ratings_file(kind, tmp_path)
    sep = SEP[kind]
    assert LOADERS[kind](tmp_path).interactions.height == 5
    cut(path, sep.join(["3", "3", "1", "87"]))
    last = first + 4
    with pytest.raises(
        DataError,
        match=rf"{path.name} line {last}: timestamp 87 \(1970-01-01\) is more than 20 years before the "
        rf"file's median timestamp \(1997-.*; line {last} is the file's last and has no newline, so the file "
        r"looks truncated$",
    ):
        LOADERS[kind](tmp_path)


@pytest.mark.parametrize("kind", LOADERS)
def test_cut_earlier_columns_on_the_last_line(tmp_path: Path, kind: str) -> None:
    path, first = ratings_file(kind, tmp_path)
    sep, last = SEP[kind], first + 4
    cut(path, sep.join(["3", "3", "1", ""]))  # cut right after the last separator
    with pytest.raises(
        DataError, match=rf"line {last}: timestamp '' is not a whole number; .*looks truncated"
    ):
        LOADERS[kind](tmp_path)
    cut(path, sep.join(["3", "3"]) + sep)  # cut inside the rating
    with pytest.raises(DataError, match=rf"line {last}: expected 4 .*found 3; .*looks truncated"):
        LOADERS[kind](tmp_path)


def test_a_missing_final_newline_alone_is_fine(tmp_path: Path) -> None:
    path, _ = ratings_file("ml-100k", tmp_path)
    path.write_text(path.read_text().rstrip("\n"))
    assert load_movielens_100k(tmp_path).interactions["timestamp"].max() == 891717742


def test_a_two_line_file_cut_off(tmp_path: Path) -> None:
    """The upper median is a good rating's time even when half the file is damaged."""
    write_ml100k(tmp_path, ratings=TIMED[:2])
    cut(tmp_path / "u.data", "2\t2\t3\t8917")
    with pytest.raises(DataError, match=r"u\.data line 2: timestamp 8917 .*looks truncated$"):
        load_movielens_100k(tmp_path)


def test_implausible_timestamp_on_any_line(tmp_path: Path) -> None:
    """A damaged value with its newline intact is caught by the range rule, without the truncation hint."""
    path, _ = ratings_file("ml-100k", tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "2\t2\t3\t8917\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"u\.data line 2: timestamp 8917 .*not a plausible rating time$"):
        load_movielens_100k(tmp_path)


@pytest.mark.parametrize("kind", LOADERS)
def test_exact_duplicate_ratings_are_removed_and_logged(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, first = ratings_file(kind, tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    sep = SEP[kind]
    # A repeat of the first rating, then the same user and item at another time (a re-rating: kept).
    path.write_text("".join([*lines, lines[-5], sep.join(["1", "1", "5", "881250950"]) + "\n"]))
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = LOADERS[kind](tmp_path)
    assert data.interactions.height == 6
    logged = (
        "1 exact duplicate ratings removed (same user, item, rating and timestamp, times being whole "
        "seconds; first repeat on line"
    )
    assert f"{logged} {first + 5})" in caplog.text


# ------------------------------------------------------------------------------------------- text encoding


def test_amazon_metadata_text_gets_replacement_characters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reviews = [{"reviewerID": "U", "asin": a, "overall": 4.0, "unixReviewTime": 1} for a in "ABC"]
    rpath = write_jsonl(tmp_path / "r.json", reviews)
    meta = tmp_path / "meta.json"
    meta.write_bytes(
        b'{"asin": "A", "title": "Plain"}\n'
        b'{"asin": "B", "title": "Caf\xe9 del Mar", "category": ["Music", "Chill\xff"]}\n'
        b"{'asin': 'C', 'title': 'Na\xefve', 'description': ['x']}\n"  # python-literal style
        b'{"asin": "UNREVIEWED", "title": "\xe9t\xe9"}\n'  # never enters the data: not counted
    )
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load_amazon_2018(rpath, meta)
    titles = dict(zip(data.items["item_id"], data.items["title"], strict=True))
    assert titles == {"A": "Plain", "B": "Caf\ufffd del Mar", "C": "Na\ufffdve"}
    assert data.items["category"][1] == "Music > Chill\ufffd"
    assert "meta.json: 2 lines have text fields that are not valid UTF-8 (first: line 2)" in caplog.text


def test_amazon_ids_must_be_valid_utf8(tmp_path: Path) -> None:
    good = {"reviewerID": "U", "asin": "A", "overall": 4.0, "unixReviewTime": 1}
    meta = tmp_path / "meta.json"
    meta.write_bytes(b'{"asin": "A", "title": "a"}\n{"asin": "B\xe9", "title": "b"}\n')
    with pytest.raises(DataError, match=r"meta\.json line 2: field 'asin' is not valid utf-8"):
        load_amazon_2018(write_jsonl(tmp_path / "r.json", [good]), meta)
    rpath = tmp_path / "r2.json"
    rpath.write_bytes(b'{"reviewerID": "U\xff", "asin": "A", "overall": 4.0, "unixReviewTime": 1}\n')
    with pytest.raises(DataError, match=r"r2\.json line 1: field 'reviewerID' is not valid utf-8"):
        load_amazon_2018(rpath, write_jsonl(tmp_path / "m.json", [{"asin": "A"}]))


def test_atomic_item_text_gets_replacement_characters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_atomic(tmp_path)
    item_file = folder / "ml-100k.item"
    lines = item_file.read_bytes().splitlines(keepends=True)
    lines[2] = "2\tMisérables, Les\t1995\tDrama Musical\n".encode("latin-1")  # a latin-1 "é" in a UTF-8 file
    item_file.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load_movielens_atomic(folder)
    assert data.items["title"][1] == "Mis\ufffdrables, Les (1995)"
    assert "ml-100k.item: 1 lines have text fields that are not valid UTF-8 (first: line 3)" in caplog.text

    lines[2] = b"2\xe9\tMiserables\t1995\tDrama\n"
    item_file.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"ml-100k\.item line 3: item_id is not valid utf-8"):
        load_movielens_atomic(folder)
    write_atomic(folder)
    inter = folder / "ml-100k.inter"
    inter.write_bytes(inter.read_bytes().replace(b"\n3\t", b"\n3\xff\t"))
    with pytest.raises(DataError, match=r"ml-100k\.inter line 6: user_id is not valid utf-8"):
        load_movielens_atomic(folder)
