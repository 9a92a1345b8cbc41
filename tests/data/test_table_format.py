"""`data.format: table`: a team's own log as CSV, TSV, Parquet or JSONL, and each documented error."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import polars as pl
import pytest

from evolora.config import DataConfig, TableColumns, load_config
from evolora.data import load_dataset
from evolora.data.formats.table import load_table
from evolora.data.loaders import detect_format
from evolora.data.times import epoch_seconds
from evolora.errors import ConfigError, DataError

COLUMNS = TableColumns(user="uid", item="iid", time="ts", rating="stars", title="name")
RATED = TableColumns(user="uid", item="iid", time="ts", rating="stars")
LABELLED = TableColumns(user="uid", item="iid", time="ts", label="clicked")
LOG = "uid,iid,ts,stars\nu1,a,2024-01-01,5\nu2,b,2024-01-02T10:00:00,1\nu1,b,1704240000,4\n"
ITEMS = "iid,name,genre\na,Apple Pie,dessert\nb,Bean Soup,soup\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, meta: Path | None = None, columns: TableColumns = RATED, unit: str = "s"):
    return load_table(path, meta, columns, unit)


def test_csv_with_items_table(tmp_path: Path) -> None:
    data = load(write(tmp_path / "log.csv", LOG), write(tmp_path / "items.csv", ITEMS), COLUMNS)
    inter = data.interactions
    assert inter["user_id"].to_list() == ["u1", "u2", "u1"]  # time order
    assert inter["timestamp"].to_list() == [1704067200, 1704189600, 1704240000]
    assert inter["rating"].to_list() == [5.0, 1.0, 4.0]
    assert dict(zip(data.items["item_id"], data.items["title"], strict=True)) == {
        "a": "Apple Pie",
        "b": "Bean Soup",
    }
    assert "genre" not in data.items.columns  # only mapped fields are read
    assert data.like_threshold == 3.0 and not data.implicit
    assert data.name == "log" and data.files == (str(tmp_path / "log.csv"), str(tmp_path / "items.csv"))


def test_load_dataset_reads_the_config(tmp_path: Path) -> None:
    write(tmp_path / "log.csv", LOG)
    write(tmp_path / "items.csv", ITEMS)
    cfg = DataConfig(
        source=str(tmp_path / "log.csv"),
        format="table",
        meta=str(tmp_path / "items.csv"),
        columns={"user": "uid", "item": "iid", "time": "ts", "rating": "stars", "genre": "genre"},
        like_threshold=4.5,
    )
    data = load_dataset(cfg)
    assert data.like_threshold == 4.5
    assert data.items["title"].to_list() == ["a", "b"]  # no title mapped: the id
    assert data.items["genre"].to_list() == ["dessert", "soup"]


def test_time_forms() -> None:
    values = pl.Series(
        [
            "881250949",
            "881250949.0",
            "2024-03-01",
            "2024-03-01T09:30:00",
            "2024-03-01 09:30:00.75",
            "2024-03-01T09:30:00Z",
            "2024-03-01T11:30:00+02:00",
            "2024-03-01T09:30",  # Python's ISO parser takes what the fixed formats miss
            "yesterday",
            None,
        ]
    )
    at_930 = 1709285400
    assert epoch_seconds(values).to_list() == [
        881250949, 881250949, 1709251200, at_930, at_930, at_930, at_930, at_930, None, None
    ]  # fmt: skip
    assert epoch_seconds(pl.Series(["1709285400123"]), "ms").to_list() == [at_930]
    assert epoch_seconds(pl.Series([1709285400123]), "ms").to_list() == [at_930]
    assert epoch_seconds(pl.Series([1709285400123456]), "us").to_list() == [at_930]
    assert epoch_seconds(pl.Series(["1709285400123456789"]), "ns").to_list() == [at_930]


def test_times_in_the_wrong_unit_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Epoch milliseconds read as seconds land in the year 56,000: an error naming the unit they look like,
    # with the line, not a date that breaks later (calendar formatting) or a silent misreading.
    millis = "uid,iid,ts,stars\nu1,a,1704067200000,5\nu2,b,1704189600000,1\n"
    named = (
        r"line 2: time '1704067200000' \(column 'ts'\) read as epoch seconds is in the year 55\d\d\d; "
        r"it looks like epoch milliseconds: set data.time_unit: ms"
    )
    with pytest.raises(DataError, match=named):
        load(write(tmp_path / "log.csv", millis))
    with pytest.raises(DataError, match=r"looks like epoch nanoseconds: set data.time_unit: ns"):
        load(write(tmp_path / "log.csv", millis.replace("000,", "000000000,")), unit="ms")
    with pytest.raises(DataError, match=r"year -\d+, outside the calendar"):
        load(write(tmp_path / "log.csv", LOG + "u3,a,-99999999999999,4\n"))
    # The other way round, a unit too large puts every time in 1970: legal, so a warning names the unit.
    data = load(write(tmp_path / "log.csv", millis), unit="ns")
    assert data.interactions["timestamp"].max() < 3600
    assert "every time in column 'ts' falls in 1970 as epoch nanoseconds; if they are epoch milliseconds, " \
        "set data.time_unit: ms" in caplog.text  # fmt: skip
    caplog.clear()
    load(write(tmp_path / "log.csv", millis), unit="ms")
    load(write(tmp_path / "log.csv", "uid,iid,ts,stars\nu1,a,1,5\nu2,b,2,1\n"), unit="ms")  # step numbers
    assert "falls in 1970" not in caplog.text


def test_tsv_gz_jsonl_and_parquet_read_alike(tmp_path: Path) -> None:
    expected = load(write(tmp_path / "log.csv", LOG)).interactions
    tsv = LOG.replace(",", "\t")
    with gzip.open(tmp_path / "log.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(tsv)
    rows = [
        dict(zip(["uid", "iid", "ts", "stars"], line.split(","), strict=True)) for line in LOG.split()[1:]
    ]
    rows[2]["ts"] = 1704240000  # JSON numbers are fine as well as strings
    rows[2]["stars"] = 4
    write(tmp_path / "log.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    parquet = pl.DataFrame(
        {
            "uid": ["u1", "u2", "u1"],
            "iid": ["a", "b", "b"],
            "ts": pl.Series(["2024-01-01", "2024-01-02T10:00:00", "2024-01-03"]).str.to_datetime(
                strict=False
            ),
            "stars": [5, 1, 4],
        }
    )
    parquet.write_parquet(tmp_path / "log.parquet")
    for name in ("log.tsv.gz", "log.jsonl", "log.parquet"):
        assert load(tmp_path / name).interactions.equals(expected), name


def test_what_spreadsheets_and_exports_write_reads_alike(tmp_path: Path) -> None:
    """A quote inside an unquoted field (12" Vinyl), lines ended by CR alone (old Mac exports), and a JSON
    lines file behind a byte order mark read as the plain file does (polars refused the first two without a
    line, the third failed on line 1)."""
    expected = load(write(tmp_path / "log.csv", LOG), write(tmp_path / "items.csv", ITEMS), COLUMNS)
    inch = load(
        write(tmp_path / "log.csv", LOG),
        write(tmp_path / "inch.csv", ITEMS.replace("Apple Pie", '12" Apple Pie')),
        COLUMNS,
    )
    assert inch.interactions.equals(expected.interactions)
    assert inch.items["title"].to_list()[0] == '12" Apple Pie'
    (tmp_path / "cr.csv").write_bytes(LOG.replace("\n", "\r").encode())
    assert load(tmp_path / "cr.csv").interactions.equals(expected.interactions)
    rows = [
        dict(zip(["uid", "iid", "ts", "stars"], line.split(","), strict=True)) for line in LOG.split()[1:]
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load(tmp_path / "bom.jsonl").interactions.equals(
        load(write(tmp_path / "log.jsonl", text)).interactions
    )
    # an error on a CR-ended file still names its line
    (tmp_path / "bad.csv").write_bytes((LOG + "u3,c,not a time,5\n").replace("\n", "\r").encode())
    with pytest.raises(DataError, match=r"bad.csv line 5: time 'not a time'"):
        load(tmp_path / "bad.csv")


def test_ids_stored_as_floats_conflicting_ratings_and_a_repeated_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whole-number ids saved as floats (pandas, a gap in the column) join ids saved as ints; rows that
    differ only in rating are kept and counted; a header naming a wanted column twice is refused."""
    log = {"uid": [1, 2, 1], "iid": [10, 20, 20], "ts": [100, 200, 300], "stars": [5, 1, 4]}
    pl.DataFrame(log).write_parquet(tmp_path / "log.parquet")
    items = pl.DataFrame({"iid": [10.0, 20.0], "name": ["Ten", "Twenty"]})
    items.write_parquet(tmp_path / "items.parquet")
    data = load(tmp_path / "log.parquet", tmp_path / "items.parquet", COLUMNS)
    assert dict(zip(data.items["item_id"], data.items["title"], strict=True)) == {"10": "Ten", "20": "Twenty"}
    pl.concat([items, pl.DataFrame({"iid": [None], "name": ["?"]})]).write_parquet(tmp_path / "gap.parquet")
    with pytest.raises(DataError, match=r"gap\.parquet row 3: no item id"):  # a gap is still an error
        load(tmp_path / "log.parquet", tmp_path / "gap.parquet", COLUMNS)
    # A NaN is a gap too (it was the user "NaN", and the others "1.0", "2.0", which no items table matched)
    pl.DataFrame({**log, "uid": [1.0, float("nan"), 1.0]}).write_parquet(tmp_path / "nan.parquet")
    with pytest.raises(DataError, match=r"nan\.parquet row 2: no user id"):
        load(tmp_path / "nan.parquet", tmp_path / "items.parquet", COLUMNS)
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        twice = load(write(tmp_path / "twice.csv", LOG + "u1,a,2024-01-01,3\n,,,\n\n , , , \n"))
    # a spreadsheet's empty rows are skipped as blank lines are, and said (an empty line is no row)
    assert "twice.csv: 2 rows with every field empty skipped (first on line 6)" in caplog.text
    assert twice.interactions.height == 4
    assert "2 interactions share their user, item and timestamp with another of a different" in caplog.text
    with pytest.raises(DataError, match=r"line 1 \(the header\): column 'iid' is named 2 times"):
        load(write(tmp_path / "header.csv", "uid,iid,ts,stars,iid\nu1,a,1,5,b\n"))


def test_items_from_the_log_without_meta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "uid,iid,ts,stars,name\nu1,a,1,5,Apple Pie\nu2,a,2,4,Apple Tart\nu2,b,3,1,\n"
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load(write(tmp_path / "log.csv", text), columns=COLUMNS)
    assert data.items["title"].to_list() == ["Apple Pie", "b"]
    assert "1 items have more than one title in the file; each keeps its first" in caplog.text
    assert "1 items have an empty title; they are called by their id" in caplog.text


def test_items_missing_from_meta_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = write(tmp_path / "items.csv", "iid,name\na,Apple Pie\nz,Never Bought\n")
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load(write(tmp_path / "log.csv", LOG), items, COLUMNS)
    assert dict(zip(data.items["item_id"], data.items["title"], strict=True)) == {
        "a": "Apple Pie",
        "z": "Never Bought",
        "b": "b",
    }
    assert "items.csv: 1 of 2 items in" in caplog.text and "called by their id" in caplog.text


def test_duplicates_are_removed_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load(write(tmp_path / "log.csv", LOG + "u1,a,2024-01-01,5\n"))
    assert data.interactions.height == 3
    assert "1 exact duplicate interactions removed" in caplog.text and "line 5" in caplog.text


def test_an_item_rated_again_later_is_kept_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Both ratings are real interactions, but the later one's history holds the earlier: said, not silent."""
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load(write(tmp_path / "log.csv", LOG + "u1,a,2024-02-01,2\n"))
    assert data.interactions.height == 4
    said = "1 (user, item) pairs are rated at more than one time (2 interactions, first on line 2)"
    assert said in caplog.text


def test_labels_and_implicit_feedback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = "uid,iid,ts,clicked\nu1,a,1,1\nu1,b,2,0\nu2,a,3,true\nu2,b,4,False\n"
    data = load(write(tmp_path / "log.csv", text), columns=LABELLED)
    assert data.interactions["rating"].to_list() == [1.0, 0.0, 1.0, 0.0]
    assert data.like_threshold == 0.5 and not data.implicit
    with caplog.at_level("WARNING", logger="evolora.data"):
        implicit = load(tmp_path / "log.csv", columns=TableColumns(user="uid", item="iid", time="ts"))
    # read as clicks, its 0 labels are positives: said, naming the column left unread
    assert "column(s) 'clicked' not read: data.columns names no rating or label" in caplog.text
    assert implicit.implicit and implicit.interactions["rating"].to_list() == [1.0] * 4
    assert implicit.summary()["implicit"] is True
    assert "liked_fraction" not in implicit.summary() and "like_threshold" not in implicit.summary()  # all 1


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("uid,iid,stars\nu1,a,5\n", r"log\.csv line 1 \(the header\): no column 'ts'"),
        (LOG + "u3,a,yesterday,4\n", r"log\.csv line 5: time 'yesterday' \(column 'ts'\) is neither epoch"),
        # day-month-year, which polars' %Y read as the year 2 (dates of the years 1-99 AD, out of order)
        (LOG + "u3,a,02-01-24,4\n", r"log\.csv line 5: time '02-01-24' \(column 'ts'\) is neither epoch"),
        (LOG + "u3,a,,4\n", r"log\.csv line 5: no time \(column 'ts' is empty\)"),
        (LOG + ",a,5,4\n", r"log\.csv line 5: no user id \(column 'uid' is empty\)"),
        (LOG + "u3,,5,4\n", r"log\.csv line 5: no item id"),
        (
            LOG + "u3,a,1704250000,good\n",
            r"log\.csv line 5: rating 'good' \(column 'stars'\) is not a number",
        ),
        (
            LOG + "u3,a,5\n",
            r"log\.csv line 5: expected 4 fields separated by ',' \(as in the header\), found 3",
        ),
        (
            LOG + "u3,a,5,4,9",
            r"line 5: expected 4 fields .*found 5; line 5 is the file's last and has no newline",
        ),
        ('uid,iid,ts,stars\nu1,"a,1,5\n', r"log\.csv line 2: not valid CSV"),
        ("", r"log\.csv: file is empty"),
        ("uid,iid,ts,stars\n", r"log\.csv: no data rows after the header"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load(write(tmp_path / "log.csv", text))


def test_bad_label_value(tmp_path: Path) -> None:
    text = "uid,iid,ts,clicked\nu1,a,1,1\nu1,b,2,yes\n"
    with pytest.raises(DataError, match=r"log\.csv line 3: label 'yes' \(column 'clicked'\) must be 0 or 1"):
        load(write(tmp_path / "log.csv", text), columns=LABELLED)


def test_bad_parquet_rows_and_jsonl_lines(tmp_path: Path) -> None:
    pl.DataFrame({"uid": ["u1", None], "iid": ["a", "b"], "ts": [1, 2], "stars": [5, 4]}).write_parquet(
        tmp_path / "log.parquet"
    )
    with pytest.raises(DataError, match=r"log\.parquet row 2: no user id \(column 'uid' is empty\)"):
        load(tmp_path / "log.parquet")
    lines = [
        '{"uid": "u1", "iid": "a", "ts": 1, "stars": 5}',
        "",
        '{"uid": "u1", "iid": "a", "ts": "x", "stars": 5}',
    ]
    write(tmp_path / "log.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"log\.jsonl line 3: time 'x'"):
        load(tmp_path / "log.jsonl")
    write(tmp_path / "log.jsonl", lines[0] + "\n")
    with pytest.raises(DataError, match=r"log\.jsonl: no record has a field 'rating'"):
        load(tmp_path / "log.jsonl", columns=TableColumns(user="uid", item="iid", time="ts", rating="rating"))


def test_bad_items_table(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", LOG)
    with pytest.raises(DataError, match=r"items\.csv line 3: item id 'a' appears again \(first on line 2\)"):
        load(log, write(tmp_path / "items.csv", "iid,name\na,Apple\na,Apple 2\n"), COLUMNS)
    with pytest.raises(DataError, match=r"items\.csv line 1 \(the header\): no column 'iid'"):
        load(log, write(tmp_path / "items.csv", "id,name\na,Apple\n"), COLUMNS)


def test_unknown_extension_and_auto_format(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"log\.xlsx: unknown table file type; data\.format: table reads \.csv"
    ):
        load(write(tmp_path / "log.xlsx", LOG))
    with pytest.raises(
        DataError, match=r"log\.csv: a table of your own is not guessed; set data\.format: table "
    ):
        detect_format(write(tmp_path / "log.csv", LOG))
    with pytest.raises(DataError, match=r"set data\.format: table and data\.columns"):
        load_dataset(DataConfig(source=str(tmp_path / "log.csv")))
    with pytest.raises(DataError, match="reads one file"):
        load_dataset(DataConfig(source=str(tmp_path), format="table", columns=COLUMNS))


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["data.format=table"], "data.format: table needs data.columns"),
        (["data.columns={user: u, item: i, time: t}"], "apply to data.format: table only"),
        (["data.format=table", "data.columns={user: u, item: i}"], r"data\.columns\.time: Field required"),
        (["data.format=table", "data.columns={user: u, item: i, time: t, rating: r, label: l}"], "not both"),
        (["data.format=table", "data.columns={user: u, item: u, time: t}"], "mapped more than once"),
        (
            ["data.format=table", "data.columns={user: u, item: i, time: t}", "data.like_threshold=2"],
            "implicit",
        ),
        (["data.format=table", "data.columns={user: u, item: i, time: t}", "data.negatives=-1"], "negatives"),
        (["data.format=table", "data.columns={user: u, item: i, time: t}", "data.separator=ab"], "one char"),
        (["data.format=table", "data.columns={user: u, item: i, time: t}", "data.separator=x"], "no letter"),
        (["data.separator=';'"], "data.separator apply to data.format: table only"),
        (["data.format=table", "data.columns={user: u, item: i, time: t}", "data.min_rating=3"], "neither"),
    ],
)
def test_config_errors(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


def test_a_csv_with_another_separator(tmp_path: Path) -> None:
    """Spreadsheets in many locales write ';' between fields: data.separator reads them (quotes as in CSV),
    and without it the error says which separator the header looks like."""
    semi = LOG.replace(",", ";").replace("u2;b", 'u2;"b;2"')
    path = write(tmp_path / "log.csv", semi)
    with pytest.raises(DataError, match=r"line 1 \(the header\).*separated by ';': set data.separator: ';'"):
        load(path)
    # a quoted comma in a row (a decimal comma, a name) split it before the header's check said the above
    comma = write(tmp_path / "comma.csv", semi.replace('"b;2"', '"b,2"'))
    with pytest.raises(
        DataError, match=r"line 3: expected 1 fields .*separated by ';': set data.separator: ';'"
    ):
        load(comma)
    data = load_table(path, None, RATED, separator=";")
    assert data.interactions["item_id"].to_list() == ["a", "b;2", "b"]
    assert data.interactions["rating"].to_list() == [5.0, 1.0, 4.0]
    # the items table of a run is read with the same separator; a .tsv file always with tabs
    items = write(tmp_path / "items.csv", ITEMS.replace(",", ";"))
    named = load_table(write(tmp_path / "l2.csv", LOG.replace(",", ";")), items, COLUMNS, separator=";")
    assert named.items["title"].to_list() == ["Apple Pie", "Bean Soup"]
    tsv = load_table(write(tmp_path / "log.tsv", LOG.replace(",", "\t")), None, RATED, separator=";")
    assert tsv.interactions.height == 3


def test_table_keys_stay_out_of_other_configs() -> None:
    """Experiments recorded before the table keys existed keep their key: defaults are not dumped."""
    assert set(load_config(None).model_dump()["data"]) == {
        "source", "format", "meta", "kcore", "like_threshold", "max_interactions"
    }  # fmt: skip
    dumped = load_config(None, ["data.negatives=3"]).model_dump()["data"]
    assert dumped["negatives"] == 3 and "negative_seed" not in dumped


# ---------------------------------------------------------------------------------------- a stage column

STAGED = TableColumns(user="uid", item="iid", time="ts", rating="stars", stage="part")
# Row order is not time order; at time 3 the stage boundary splits two equal times (stage 2 first in the
# file). The same interaction in another stage is not a duplicate.
STAGED_LOG = (
    "uid,iid,ts,stars,part\nu1,a,5,5,2\nu1,b,1,4,1\nu2,a,4,1,2.0\nu3,c,3,5,2\nu2,b,2,2,1\nu3,c,3,5, 1 \n"
)


def test_a_stage_column_gives_preset_stages(tmp_path: Path) -> None:
    from evolora.config import StagingConfig
    from evolora.data.staging import assign_stages, num_stages_of

    data = load(write(tmp_path / "log.csv", STAGED_LOG), columns=STAGED)
    file = pl.read_csv(tmp_path / "log.csv", schema_overrides={"part": pl.Utf8}, infer_schema=False)
    file = file.with_columns(part=pl.col("part").str.strip_chars().cast(pl.Float64).cast(pl.Int32))
    expected = file.sort(pl.col("ts").cast(pl.Int64), "part", maintain_order=True)["part"].to_list()
    assert data.interactions["timestamp"].to_list() == [1, 2, 3, 3, 4, 5]
    assert data.preset_stages is not None and data.preset_stages.tolist() == expected == [1, 1, 1, 2, 2, 2]
    assert data.interactions.columns == ["user_id", "item_id", "rating", "timestamp"]
    assert not data.synthetic_time
    staged = assign_stages(data.interactions, StagingConfig(), data.preset_stages)  # auto -> preset
    assert num_stages_of(staged) == 2 and staged["stage"].to_list() == expected
    by_time = assign_stages(data.interactions, StagingConfig(scheme="lsat", n_stages=2), data.preset_stages)
    assert by_time["stage"].to_list() != expected  # lsat ignores the column and cuts by time
    with pytest.raises(DataError, match=r"staging\.n_stages=3 but the dataset comes with 2 stages"):
        assign_stages(data.interactions, StagingConfig(scheme="preset", n_stages=3), data.preset_stages)


def test_a_stage_column_survives_filters(tmp_path: Path) -> None:
    """k-core and recency cuts drop rows: the stages of the rows kept stay theirs."""
    write(tmp_path / "log.csv", STAGED_LOG)
    cfg = DataConfig(
        source=str(tmp_path / "log.csv"),
        format="table",
        columns=STAGED,
        kcore={"user": 2, "item": 2},
        max_interactions=5,
    )
    data = load_dataset(cfg)
    kept = data.interactions.with_columns(stage=pl.Series(data.preset_stages))
    file = pl.read_csv(tmp_path / "log.csv", infer_schema=False).select(
        user_id="uid", item_id="iid", timestamp=pl.col("ts").cast(pl.Int64), stage=pl.col("part")
    )
    file = file.with_columns(stage=pl.col("stage").str.strip_chars().cast(pl.Float64).cast(pl.Int32))
    assert 0 < kept.height < 6
    assert kept.join(file, on=["user_id", "item_id", "timestamp", "stage"], how="semi").height == kept.height


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ("u4,a,6,5,\n", r"log\.csv line 8: no stage \(column 'part' is empty\)"),
        ("u4,a,6,5,0\n", r"log\.csv line 8: stage '0' \(column 'part'\) is not a whole number >= 1"),
        ("u4,a,6,5,1.5\n", r"line 8: stage '1\.5' .* is not a whole number"),
        ("u4,a,6,5,late\n", r"line 8: stage 'late' .* is not a whole number"),
    ],
)
def test_bad_stage_values(tmp_path: Path, row: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load(write(tmp_path / "log.csv", STAGED_LOG + row), columns=STAGED)


def test_stages_out_of_time_order_or_missing(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"log\.csv line 8: stage 1 \(column 'part'\) at 1970-01-01 00:00:06 is later than stage 2 at "
        r"1970-01-01 00:00:05 \(line 2\): stages must follow one another in time",
    ):
        load(write(tmp_path / "log.csv", STAGED_LOG + "u4,a,6,5,1\n"), columns=STAGED)
    with pytest.raises(DataError, match=r"preset stages \[2\] have no interactions"):
        no_stage_2 = STAGED_LOG.replace(",2\n", ",3\n").replace(",2.0\n", ",3\n")
        load(write(tmp_path / "log.csv", no_stage_2), columns=STAGED)
    with pytest.raises(DataError, match=r"line 1 \(the header\): no column 'part'"):
        load(write(tmp_path / "plain.csv", LOG), columns=STAGED)


def test_the_stage_key_stays_out_of_unstaged_configs() -> None:
    dumped = load_config(None, ["data.format=table", "data.columns={user: u, item: i, time: t}"]).model_dump()
    assert "stage" not in dumped["data"]["columns"]
    staged = ["data.format=table", "data.columns={user: u, item: i, time: t, stage: s}"]
    assert load_config(None, staged).model_dump()["data"]["columns"]["stage"] == "s"


def test_iso_times_that_span_1970_and_parquet_times_of_other_types(tmp_path: Path) -> None:
    """ISO dates from 1969 to 1991 were refused as a column mixing units (a check meant for epoch numbers);
    a Parquet time column of pandas' `category` type (or Enum, Decimal) was refused as no time; an unsigned
    -1 sentinel gave a traceback; a time past the calendar written in ISO got epoch-unit advice."""
    old = "uid,iid,ts,stars\nu1,a,1969-07-20,5\nu2,b,1975-01-01,1\nu1,b,1985-01-01,4\nu2,a,1991-06-01,3\n"
    data = load(write(tmp_path / "old.csv", old))
    assert data.interactions["timestamp"].to_list() == [-14256000, 157766400, 473385600, 675734400]
    mixed = "uid,iid,ts,stars\nu1,a,20240101,5\nu2,b,2024-01-02,1\n"  # yyyymmdd read as 1970, beside 2024
    with pytest.raises(DataError, match=r"line 2: .*mixes units"):
        load(write(tmp_path / "mixed.csv", mixed))

    times = ["2024-03-01T12:00:00", "2024-03-02T12:00:00"]
    frame = pl.DataFrame({"uid": ["u1", "u2"], "iid": ["a", "b"], "stars": [5, 1]})
    for dtype in (pl.Categorical, pl.Enum(times)):
        frame.with_columns(ts=pl.Series(times, dtype=dtype)).write_parquet(tmp_path / "t.parquet")
        assert load(tmp_path / "t.parquet").interactions["timestamp"].to_list() == [1709294400, 1709380800]
    # numbers as category text are numbers: one beside another unit is refused as in a CSV
    frame.with_columns(ts=pl.Series(["20240101", "1704153600"], dtype=pl.Categorical)).write_parquet(
        tmp_path / "c.parquet"
    )
    with pytest.raises(DataError, match=r"mixes units"):
        load(tmp_path / "c.parquet")
    frame.with_columns(ts=pl.Series([1709294400, 1709380800], dtype=pl.Decimal(12, 0))).write_parquet(
        tmp_path / "d.parquet"
    )
    assert load(tmp_path / "d.parquet").interactions["timestamp"].to_list() == [1709294400, 1709380800]
    frame.with_columns(ts=pl.Series([1709294400, 2**64 - 1], dtype=pl.UInt64)).write_parquet(
        tmp_path / "u.parquet"
    )
    with pytest.raises(DataError, match=r"row 2: time 18446744073709551615 \(column 'ts'\) is neither"):
        load(tmp_path / "u.parquet")

    late = "uid,iid,ts,stars\nu1,a,2024-01-01,5\nu2,b,9999-12-31T23:30:00-01:00,1\n"
    with pytest.raises(
        DataError, match=r"line 3: .* is outside the calendar evolora reads \(years 1-9999 UTC\)$"
    ):
        load(write(tmp_path / "late.csv", late))
