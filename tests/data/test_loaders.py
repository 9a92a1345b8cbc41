"""Loaders: each real source format, written small by the test, and each documented bad-input error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

import polars as pl
import pytest
from datafiles import REAL_ML100K, write_atomic, write_jsonl, write_ml1m, write_ml100k

import evolora.data.readers as readers
from evolora.config import DataConfig
from evolora.data import (
    load_amazon_2018,
    load_amazon_2023,
    load_dataset,
    load_movielens_1m,
    load_movielens_100k,
    load_movielens_atomic,
)
from evolora.data.formats import FORMATS, Format
from evolora.data.loaders import detect_format
from evolora.errors import DataError

TITLES = {
    "1": "Toy Story (1995)",
    "2": "Misérables, Les (1995)",
    "3": "Land Before Time III: The Time of the Great Giving (1995) (V)",
}


def check_movielens(data) -> None:
    inter = data.interactions
    assert inter.schema == {
        "user_id": pl.Utf8,
        "item_id": pl.Utf8,
        "rating": pl.Float64,
        "timestamp": pl.Int64,
    }
    # Sorted by time; the two t=300 rows keep their file order (user 1 before user 2).
    assert inter.rows() == [
        ("2", "2", 3.0, 100),
        ("1", "2", 4.0, 200),
        ("1", "1", 5.0, 300),
        ("2", "1", 2.0, 300),
        ("3", "3", 1.0, 400),
    ]
    titles = dict(zip(data.items["item_id"], data.items["title"], strict=True))
    assert titles == TITLES
    genres = dict(zip(data.items["item_id"], data.items["genre"], strict=True))
    assert genres["1"] == "Animation, Children's, Comedy"
    assert data.items.filter(pl.col("item_id") == "1")["year"].item() == "1995"
    assert data.like_threshold == 3.0
    assert (data.n_users, data.n_items) == (3, 3)


def test_movielens_100k(tmp_path: Path) -> None:
    check_movielens(load_movielens_100k(write_ml100k(tmp_path / "ml")))


def test_movielens_100k_atomic(tmp_path: Path) -> None:
    data = load_movielens_atomic(write_atomic(tmp_path / "atomic"))
    check_movielens(data)
    assert data.name == "ml-100k"
    # The .inter file itself works as the path too.
    assert load_movielens_atomic(tmp_path / "atomic" / "ml-100k.inter").interactions.height == 5


def test_both_ml100k_routes_agree(tmp_path: Path) -> None:
    a = load_movielens_100k(write_ml100k(tmp_path / "a"))
    b = load_movielens_atomic(write_atomic(tmp_path / "b"))
    assert a.interactions.equals(b.interactions)
    assert a.items.select("item_id", "title", "genre").equals(b.items.select("item_id", "title", "genre"))


def test_atomic_float_timestamp(tmp_path: Path) -> None:
    folder = write_atomic(tmp_path, ratings=[("1", "1", 4, "881250949.0"), ("2", "2", 5, " 881250950 ")])
    assert load_movielens_atomic(folder).interactions["timestamp"].to_list() == [881250949, 881250950]


def test_movielens_1m(tmp_path: Path) -> None:
    data = load_movielens_1m(write_ml1m(tmp_path))
    check_movielens(data)
    assert data.name == "ml-1m"


@pytest.mark.parametrize(
    ("write", "load", "files"),
    [
        (write_ml100k, load_movielens_100k, ["u.data", "u.item"]),
        (write_ml1m, load_movielens_1m, ["ratings.dat", "movies.dat"]),
        (write_atomic, load_movielens_atomic, ["ml-100k.inter", "ml-100k.item"]),
    ],
)
def test_byte_order_marks_are_not_part_of_an_id(tmp_path: Path, write, load, files) -> None:
    """A BOM read as latin-1 made the first user a new one ('\xef\xbb\xbf2'), or the first item unknown."""
    folder = write(tmp_path)
    for name in files:
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    check_movielens(load(folder))


@pytest.mark.parametrize(
    ("write", "load", "name"),
    [(write_ml100k, load_movielens_100k, "u.item"), (write_ml1m, load_movielens_1m, "movies.dat")],
)
def test_movie_titles_resaved_as_utf8_keep_their_letters(tmp_path: Path, write, load, name) -> None:
    folder = write(tmp_path)
    path = folder / name
    path.write_bytes(path.read_bytes().decode("latin-1").encode("utf-8"))
    check_movielens(load(folder))  # "Misérables", not "MisÃ©rables"


def test_amazon_2018(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reviews = [
        {
            "reviewerID": "U1",
            "asin": "A",
            "overall": 5.0,
            "unixReviewTime": 300,
            "reviewText": "x",
            "vote": "2",
        },
        {
            "reviewerID": "U2",
            "asin": "B",
            "overall": 2.0,
            "unixReviewTime": 100,
            "style": {"Format:": "Kindle"},
        },
        {"reviewerID": "U1", "asin": "C", "overall": 4, "unixReviewTime": 200},
        {"reviewerID": "U2", "asin": "B", "overall": 2.0, "unixReviewTime": 100},  # exact duplicate
        {"reviewerID": "U3", "asin": "Z", "overall": 3.0, "unixReviewTime": 400},  # no metadata record
    ]
    meta = [
        {
            "asin": "A",
            "title": "Tom &amp; Jerry &#39;s Book",
            "category": ["Books", "Kids"],
            "date": "May 2, 2001",
        },
        # The python-literal style of some 2018 metadata files:
        "{'asin': 'B', 'title': 'Bread & Butter', 'description': ['Good', 'bread.'], 'category': []}",
        {"asin": "C", "description": "One string"},  # no title
        {"asin": "A", "title": "Repeated record"},
        {"asin": "UNREVIEWED", "title": "never rated"},
    ]
    rpath = write_jsonl(tmp_path / "Books_5.json.gz", reviews, gz=True)
    mpath = write_jsonl(tmp_path / "meta_Books.json", meta)
    with caplog.at_level(logging.INFO, logger="evolora.data"):
        data = load_amazon_2018(rpath, mpath)
    assert data.name == "Books_5"
    assert data.interactions.rows() == [
        ("U2", "B", 2.0, 100),
        ("U1", "C", 4.0, 200),
        ("U1", "A", 5.0, 300),
        ("U3", "Z", 3.0, 400),
    ]
    items = {r["item_id"]: r for r in data.items.iter_rows(named=True)}
    assert set(items) == {"A", "B", "C", "Z"}
    assert items["A"]["title"] == "Tom & Jerry 's Book"  # entities unescaped, first record kept
    assert items["A"]["category"] == "Books > Kids" and items["A"]["year"] == "2001"
    assert items["B"]["title"] == "Bread & Butter" and items["B"]["description"] == "Good bread."
    assert items["C"]["title"] == "item C" and items["C"]["description"] == "One string"
    assert items["Z"]["title"] == "item Z"
    text = caplog.text
    assert "1 exact duplicate reviews removed" in text
    assert "1 repeated records" in text
    assert "1 reviewed items (1 reviews) have no record" in text
    assert "1 items have no title" in text  # C; Z, which has no record, was counted with those


def test_amazon_2023(tmp_path: Path) -> None:
    reviews = [
        {"rating": 5.0, "title": "t", "text": "x", "asin": "A1", "parent_asin": "P1", "user_id": "U1",
         "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": True},
        {"rating": 1.0, "asin": "A2", "parent_asin": "P1", "user_id": "U2", "timestamp": 1588687727000},
        {"rating": 4.0, "asin": "A3", "parent_asin": "P2", "user_id": "U1", "timestamp": 1600000000500},
    ]  # fmt: skip
    meta = [
        {"parent_asin": "P1", "title": "Guitar", "main_category": "Musical Instruments",
         "categories": ["Musical Instruments", "Guitars"], "description": ["Six", "strings"], "details": {}},
        {"parent_asin": "P2", "title": "Drum", "main_category": "Musical Instruments", "categories": [],
         "description": []},
    ]  # fmt: skip
    data = load_amazon_2023(
        write_jsonl(tmp_path / "r.jsonl", reviews), write_jsonl(tmp_path / "m.jsonl", meta)
    )
    assert data.interactions.rows() == [
        ("U2", "P1", 1.0, 1588687727),
        ("U1", "P1", 5.0, 1588687728),
        ("U1", "P2", 4.0, 1600000000),
    ]
    items = {r["item_id"]: r for r in data.items.iter_rows(named=True)}
    assert items["P1"]["category"] == "Musical Instruments > Guitars"
    assert items["P1"]["description"] == "Six strings"
    assert items["P2"]["category"] == "Musical Instruments" and items["P2"]["description"] is None


def test_amazon_2023_timestamps_in_two_units_are_refused(tmp_path: Path) -> None:
    reviews = [
        {"rating": 5.0, "parent_asin": "P1", "user_id": "U1", "timestamp": 1588687728923},
        {"rating": 4.0, "parent_asin": "P1", "user_id": "U2", "timestamp": 1588687729},  # seconds
    ]
    meta = [{"parent_asin": "P1", "title": "Guitar"}]
    with pytest.raises(
        DataError,
        match=r"r\.jsonl line 2: timestamp 1588687729 is 1970-01-19 .* line 1's 1588687728923 is "
        r"2020-05-05: the file mixes seconds and milliseconds",
    ):
        load_amazon_2023(write_jsonl(tmp_path / "r.jsonl", reviews), write_jsonl(tmp_path / "m.jsonl", meta))


def test_reviews_of_unknown_items_are_counted_once_duplicates_are_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    review = {"rating": 5.0, "parent_asin": "Z", "user_id": "U1", "timestamp": 1588687728923}
    meta = [{"parent_asin": "P1", "title": "Guitar"}]
    data = load_amazon_2023(
        write_jsonl(tmp_path / "r.jsonl", [review, review]), write_jsonl(tmp_path / "m.jsonl", meta)
    )
    assert data.interactions.height == 1
    assert "1 reviewed items (1 reviews) have no record" in caplog.text


def test_a_format_naming_the_other_amazon_release_says_so(tmp_path: Path) -> None:
    r18 = write_jsonl(
        tmp_path / "Books.json", [{"reviewerID": "U", "asin": "A", "overall": 1, "unixReviewTime": 1}]
    )
    meta = write_jsonl(tmp_path / "meta_Books.json", [{"asin": "A"}])
    with pytest.raises(
        DataError, match=r"these are Amazon 2018 reviews, not 2023's; set data\.format: amazon-2018"
    ):
        load_dataset(DataConfig(source=str(r18), meta=str(meta), format="amazon-2023"))


def test_jsonl_chunks_keep_line_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks: the polars path, the line-by-line path and the error all count lines across chunks."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", 200)
    reviews = [{"reviewerID": f"U{i}", "asin": "A", "overall": 4.0, "unixReviewTime": i} for i in range(40)]
    reviews[25] = "{'reviewerID': 'U25', 'asin': 'A', 'overall': 4.0, 'unixReviewTime': 25}"
    meta = write_jsonl(tmp_path / "meta.json", [{"asin": "A", "title": "a"}])
    data = load_amazon_2018(write_jsonl(tmp_path / "r.json", [*reviews, ""]), meta)
    assert data.interactions["user_id"].to_list() == [f"U{i}" for i in range(40)]
    reviews[33] = {"reviewerID": "U33", "asin": "A", "overall": 4.0, "unixReviewTime": "soon"}
    with pytest.raises(DataError, match=r"r\.json line 34: field 'unixReviewTime'"):
        load_amazon_2018(write_jsonl(tmp_path / "r.json", reviews), meta)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"u\.data: file not found"):
        load_movielens_100k(tmp_path)


def test_missing_column(tmp_path: Path) -> None:
    folder = write_atomic(tmp_path)
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t1\t5\n")
    with pytest.raises(DataError, match=r"ml-100k\.inter line 1: missing column 'timestamp'"):
        load_movielens_atomic(folder)


def test_missing_json_field(tmp_path: Path) -> None:
    reviews = [
        {"reviewerID": "U1", "asin": "A", "overall": 5.0, "unixReviewTime": 1},
        {"reviewerID": "U1", "asin": "A", "unixReviewTime": 2},
    ]
    rpath = write_jsonl(tmp_path / "r.json", ["", *reviews])  # a leading blank line still counts
    with pytest.raises(DataError, match=r"r\.json line 3: missing field 'overall'"):
        load_amazon_2018(rpath, write_jsonl(tmp_path / "meta.json", [{"asin": "A", "title": "a"}]))


def test_wrong_field_count(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path)
    (folder / "u.data").write_text("1\t1\t5\t300\n1\t2\t4\n")
    with pytest.raises(DataError, match=r"u\.data line 2: expected 4 fields separated by '\\t', found 3"):
        load_movielens_100k(folder)


def test_non_numeric_timestamp(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path)
    (folder / "u.data").write_text("1\t1\t5\t300\n1\t2\t4\t200\n2\t1\t3\tyesterday\n")
    with pytest.raises(DataError, match=r"u\.data line 3: timestamp 'yesterday' is not a whole number"):
        load_movielens_100k(folder)


def test_non_numeric_timestamp_counts_header(tmp_path: Path) -> None:
    folder = write_atomic(tmp_path, ratings=[("1", "1", 4, 100), ("1", "2", 4, "1.5")])
    with pytest.raises(DataError, match=r"ml-100k\.inter line 3: timestamp '1\.5' is not a whole number"):
        load_movielens_atomic(folder)


def test_non_numeric_rating(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path)
    (folder / "ratings.dat").write_text("1::1::5::300\n1::2::four::200\n")
    with pytest.raises(DataError, match=r"ratings\.dat line 2: rating 'four' is not a number"):
        load_movielens_1m(folder)
    reviews = [{"reviewerID": "U1", "asin": "A", "overall": "five", "unixReviewTime": 1}]
    with pytest.raises(DataError, match=r"r\.json line 1: field 'overall' should be a number"):
        load_amazon_2018(
            write_jsonl(tmp_path / "r.json", reviews), write_jsonl(tmp_path / "m.json", [{"asin": "A"}])
        )


def test_unknown_item(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path)
    (folder / "u.data").write_text("1\t1\t5\t300\n1\t99\t4\t200\n")
    with pytest.raises(DataError, match=r"unknown item '99' in .*u\.data line 2: not in .*u\.item"):
        load_movielens_100k(folder)


def test_empty_files(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "a")
    (folder / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u\.data: file is empty"):
        load_movielens_100k(folder)
    folder = write_atomic(tmp_path / "b")
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    with pytest.raises(DataError, match="no data rows after the header"):
        load_movielens_atomic(folder)
    meta = write_jsonl(tmp_path / "m.json", [{"asin": "A"}])
    with pytest.raises(DataError, match=r"r\.json: file is empty"):
        load_amazon_2018(write_jsonl(tmp_path / "r.json", ["", "  "]), meta)


def test_duplicate_item_ids(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path)
    with (folder / "movies.dat").open("a") as f:
        f.write("2::Again (1999)::Drama\n")
    with pytest.raises(DataError, match=r"movies\.dat line 4: duplicate item id '2' \(first on line 2\)"):
        load_movielens_1m(folder)


def test_bad_json_line(tmp_path: Path) -> None:
    meta = write_jsonl(tmp_path / "m.json", [{"asin": "A"}])
    good = {"reviewerID": "U", "asin": "A", "overall": 1, "unixReviewTime": 1}
    rpath = write_jsonl(tmp_path / "r.json", [good, '{"reviewerID": "U", "asin": '])
    with pytest.raises(DataError, match=r"r\.json line 2: not a JSON object"):
        load_amazon_2018(rpath, meta)


def test_corrupt_gzip(tmp_path: Path) -> None:
    (tmp_path / "r.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"r\.json\.gz: cannot read"):
        load_amazon_2018(tmp_path / "r.json.gz", write_jsonl(tmp_path / "m.json", [{"asin": "A"}]))


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe",
        b"1\t1\n",
        b"a\tb\tc\td\n",
        b"1\t1\t5\t\n",
        b"\t1\t5\t3\n",
        b"1\t1\tnan\t3\n",
        b"1\t1\t5\t1e99\n",
    ],
)
def test_garbage_never_escapes_as_traceback(tmp_path: Path, content: bytes) -> None:
    folder = write_ml100k(tmp_path)
    (folder / "u.data").write_bytes(content)
    with pytest.raises(DataError):
        load_movielens_100k(folder)


# ------------------------------------------------------------------------------------------ load_dataset


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format(write_ml100k(tmp_path / "a")) == "ml-100k"
    assert detect_format(tmp_path / "a" / "u.data") == "ml-100k"
    assert detect_format(write_atomic(tmp_path / "b")) == "ml-100k-atomic"
    assert detect_format(write_ml1m(tmp_path / "c")) == "ml-1m"
    r18 = [{"reviewerID": "U", "asin": "A", "overall": 1, "unixReviewTime": 1}]
    write_jsonl(tmp_path / "d" / "Books.json", r18)
    write_jsonl(tmp_path / "d" / "meta_Books.json", [{"asin": "A"}])
    assert detect_format(tmp_path / "d") == "amazon-2018"
    r23 = [{"user_id": "U", "parent_asin": "A", "rating": 1, "timestamp": 1000}]
    write_jsonl(tmp_path / "e" / "Books.jsonl.gz", r23, gz=True)
    write_jsonl(tmp_path / "e" / "meta_Books.jsonl.gz", [{"parent_asin": "A"}], gz=True)
    assert detect_format(tmp_path / "e") == "amazon-2023"


def test_format_registry_matches_the_config(tmp_path: Path) -> None:
    config_formats = set(get_args(DataConfig.model_fields["format"].annotation)) - {"auto"}
    assert set(FORMATS) == set(get_args(Format)) == config_formats
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: cannot guess the format from the file name; expected "):
        detect_format(tmp_path / "notes.txt")


def test_load_dataset_paths(tmp_path: Path) -> None:
    check_movielens(load_dataset(DataConfig(source=str(write_ml100k(tmp_path / "a")))))
    check_movielens(load_dataset(DataConfig(source=str(write_atomic(tmp_path / "b") / "ml-100k.inter"))))
    check_movielens(load_dataset(DataConfig(source=str(write_ml1m(tmp_path / "c")), format="ml-1m")))
    r23 = [{"user_id": "U", "parent_asin": "A", "rating": 1, "timestamp": 1000}]
    rpath = write_jsonl(tmp_path / "e" / "Books.jsonl", r23)
    mpath = write_jsonl(tmp_path / "e" / "meta_Books.jsonl", [{"parent_asin": "A", "title": "a"}])
    assert load_dataset(DataConfig(source=str(tmp_path / "e"))).items["title"].to_list() == ["a"]
    assert load_dataset(DataConfig(source=str(rpath), meta=str(mpath))).interactions.height == 1
    with pytest.raises(DataError, match=r"set data\.meta"):
        load_dataset(DataConfig(source=str(rpath)))
    write_jsonl(tmp_path / "e" / "Movies.jsonl", r23)
    with pytest.raises(DataError, match=r"cannot tell which files to load.*Books\.jsonl.*Movies\.jsonl"):
        load_dataset(DataConfig(source=str(tmp_path / "e")))
    with pytest.raises(DataError, match="neither an existing path nor a registered dataset"):
        load_dataset(DataConfig(source=str(tmp_path / "nowhere")))
    (tmp_path / "f").mkdir()
    with pytest.raises(DataError, match="no data files found"):
        load_dataset(DataConfig(source=str(tmp_path / "f")))


def test_amazon_folder_with_data_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data.meta file in the folder was counted as a second reviews file too; `~` was not expanded."""
    r23 = [{"user_id": "U", "parent_asin": "A", "rating": 1, "timestamp": 1000}]
    write_jsonl(tmp_path / "e" / "reviews.jsonl", r23)
    write_jsonl(tmp_path / "e" / "items.jsonl", [{"parent_asin": "A", "title": "a"}])
    data = load_dataset(DataConfig(source=str(tmp_path / "e"), meta=str(tmp_path / "e" / "items.jsonl")))
    assert data.items["title"].to_list() == ["a"]
    monkeypatch.setenv("HOME", str(tmp_path))
    data = load_dataset(DataConfig(source=str(tmp_path / "e"), meta="~/e/items.jsonl"))
    assert data.items["title"].to_list() == ["a"]


def test_a_folder_of_json_that_is_no_amazon_release_says_how_to_load_it(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "log" / "events.jsonl", [{"who": "u1", "what": "i1", "when": 5}])
    with pytest.raises(DataError, match=r"unknown JSON format .* set data\.format: table"):
        load_dataset(DataConfig(source=str(tmp_path / "log")))


def test_the_metadata_hint_names_an_option_that_exists(tmp_path: Path) -> None:
    rpath = write_jsonl(
        tmp_path / "Books.jsonl", [{"user_id": "U", "parent_asin": "A", "rating": 1, "timestamp": 1}]
    )
    with pytest.raises(
        DataError, match=r"set data\.meta \(`--set data\.meta=FILE`; --meta in `evolora data info`\)"
    ):
        load_dataset(DataConfig(source=str(rpath)))


def test_data_meta_beside_a_format_that_reads_none_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = str(write_ml100k(tmp_path))
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        check_movielens(load_dataset(DataConfig(source=folder, meta="items.csv")))
    assert "data.meta (items.csv) is not read: ml-100k data takes its items from its own files" in caplog.text


def test_load_dataset_filters(tmp_path: Path) -> None:
    folder = str(write_ml100k(tmp_path))
    data = load_dataset(DataConfig(source=folder, like_threshold=4.0, max_interactions=3))
    assert data.like_threshold == 4.0
    assert data.interactions["timestamp"].to_list() == [300, 300, 400]
    assert len(data.notes) == 1
    data = load_dataset(DataConfig(source=folder, kcore={"user": 2, "item": 2}))
    assert sorted(data.interactions["user_id"].unique()) == ["1", "2"]
    with pytest.raises(DataError, match="removes every interaction"):
        load_dataset(DataConfig(source=folder, kcore={"user": 5}))


def test_min_rating_comes_before_the_k_core(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """RecBole's ML-1M benchmark keeps ratings >= 3, then cuts a 10-core: the order matters (user 2 keeps
    one rating, so a 2-core of users then drops it)."""
    folder = str(write_ml100k(tmp_path))
    with caplog.at_level(logging.INFO, logger="evolora.data"):
        data = load_dataset(DataConfig(source=folder, min_rating=3))
    assert sorted(data.interactions["rating"].to_list()) == [3.0, 4.0, 5.0]
    assert "data.min_rating 3 removed 2 of 5 interactions" in caplog.text
    cored = load_dataset(DataConfig(source=folder, min_rating=3, kcore={"user": 2}))
    assert cored.interactions["user_id"].to_list() == ["1", "1"]
    with pytest.raises(DataError, match=r"no interaction is rated >= data\.min_rating 6"):
        load_dataset(DataConfig(source=folder, min_rating=6))


@pytest.mark.skipif(not REAL_ML100K.is_dir(), reason="shared ml-100k copy not present")
def test_real_ml100k(monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_movielens_atomic(REAL_ML100K)
    assert (data.n_users, data.n_items, data.interactions.height) == (943, 1682, 100000)
    titles = dict(zip(data.items["item_id"], data.items["title"], strict=True))
    assert titles["1"] == "Toy Story (1995)"
    assert titles["267"] == "unknown"
    assert titles["1412"] == "Land Before Time III: The Time of the Great Giving (1995) (V)"
    # The registered name through the mirror route gives the same data.
    monkeypatch.setenv("EVOLORA_DATA_MIRROR", str(REAL_ML100K.parent))
    fetched = load_dataset(DataConfig(source="ml-100k"))
    assert fetched.name == "ml-100k" and fetched.interactions.equals(data.interactions)


def test_times_past_the_calendar_are_an_error_naming_the_line(tmp_path: Path) -> None:
    """Epoch milliseconds in a format of epoch seconds land in the year 32971: the line is named, not used."""
    folder = write_ml1m(tmp_path / "ml1m")
    with open(folder / "ratings.dat", "a") as f:
        f.write("3::1::4::978300500000\n")
    with pytest.raises(DataError, match=r"ratings\.dat line 6: timestamp 978300500000 .* year 32971.*milli"):
        load_dataset(DataConfig(source=str(folder)))


def test_amazon_2023_times_in_seconds_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reviews = [{"user_id": "U", "parent_asin": "P", "rating": 5.0, "timestamp": 1588687728}]
    meta = [{"parent_asin": "P", "title": "Guitar"}]
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        load_amazon_2023(write_jsonl(tmp_path / "r.jsonl", reviews), write_jsonl(tmp_path / "m.jsonl", meta))
    assert "every timestamp falls in 1970 as epoch milliseconds" in caplog.text


def test_amazon_2023_times_past_the_calendar_are_named_as_the_file_has_them(tmp_path: Path) -> None:
    """The error showed the time divided by 1000 and called it epoch seconds, then advised milliseconds:
    the unit the file was already read in."""
    reviews = [
        {"user_id": "U", "parent_asin": "P", "rating": 5.0, "timestamp": 1588687728000},
        {"user_id": "V", "parent_asin": "P", "rating": 4.0, "timestamp": 1600000100000123},
    ]
    meta = [{"parent_asin": "P", "title": "Guitar"}]
    with pytest.raises(DataError) as refused:
        load_amazon_2023(write_jsonl(tmp_path / "r.jsonl", reviews), write_jsonl(tmp_path / "m.jsonl", meta))
    assert (
        "r.jsonl line 2: timestamp 1600000100000123 (epoch milliseconds, as this format's times are read) is "
        "in the year 52671, past the calendar; it looks like epoch microseconds"
    ) in str(refused.value)


def test_a_byte_order_mark_does_not_hide_the_amazon_format(tmp_path: Path) -> None:
    r18 = [{"reviewerID": "U", "asin": "A", "overall": 1, "unixReviewTime": 1}]
    path = write_jsonl(tmp_path / "d" / "Books.json", r18)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    write_jsonl(tmp_path / "d" / "meta_Books.json", [{"asin": "A"}])
    assert detect_format(tmp_path / "d") == "amazon-2018"
    assert load_dataset(DataConfig(source=str(tmp_path / "d"))).interactions.height == 1


def test_number_ids_read_the_same_on_both_jsonl_paths(tmp_path: Path) -> None:
    """A chunk polars cannot read (one python-literal line) is read line by line: its number ids must come
    out as polars writes them, or one user becomes two across chunks."""
    fields = {"user_id": "str", "parent_asin": "str", "rating": "num", "timestamp": "int"}
    records = [{"user_id": u, "parent_asin": "P", "rating": 1, "timestamp": 5} for u in (1.0, 2.5, 1e-7, 10)]
    fast = readers.read_jsonl(write_jsonl(tmp_path / "fast.jsonl", records), fields, ())
    slow_records = [*records, "{'user_id': 'x', 'parent_asin': 'P', 'rating': 1, 'timestamp': 5}"]
    slow = readers.read_jsonl(write_jsonl(tmp_path / "slow.jsonl", slow_records), fields, ())
    # (what text a float becomes is polars' choice, "1" for 1.0 in polars 2: the two paths must agree)
    assert slow["user_id"].to_list()[:-1] == fast["user_id"].to_list() and fast["user_id"][3] == "10"


def test_a_jsonl_file_cut_short_says_so(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl", [{"user_id": "U", "parent_asin": "P", "rating": 5, "timestamp": 9}]
    )
    path.write_bytes(path.read_bytes() + b'{"user_id": "U", "parent_as')
    fields = {"user_id": "str", "parent_asin": "str", "rating": "num", "timestamp": "int"}
    with pytest.raises(
        DataError, match=r"line 2: not a JSON object.*has no newline, so the file looks truncated"
    ):
        readers.read_jsonl(path, fields, ())


def test_star_ratings_outside_one_to_five_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_ml1m(tmp_path / "ml1m")
    with open(folder / "ratings.dat", "a") as f:
        f.write("3::1::1e300::500\n3::2::-7::600\n")
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        load_dataset(DataConfig(source=str(folder)))
    assert "2 ratings outside 1..5 stars (first on line 6: 1e+300)" in caplog.text


def test_a_folder_named_as_a_registered_dataset_says_it_is_read_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`evolora data to-csv ml-100k ml-100k` makes such a folder; the error did not say why the dataset
    was not used."""
    (tmp_path / "ml-100k").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no data files found.*\(the path ml-100k here is read, not the"):
        load_dataset(DataConfig(source="ml-100k"))
