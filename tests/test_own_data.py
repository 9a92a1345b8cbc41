"""A team's own log (`data.format: table`) end to end on the tiny model: the shipped example as CSV and as
Parquet, explicit 0/1 labels, implicit feedback with sampled negatives, and a log that brings its own
stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from evolora.cli import app
from evolora.config import RunConfig
from evolora.data.prepare import prepare_data
from evolora.data.samples import split_pools
from evolora.errors import ConfigError, DataError
from evolora.experiment import run_experiment
from tests.data.make_example import write_example
from tests.helpers import EXAMPLE_COLUMNS, tiny_config

HERE = Path(__file__).resolve().parent / "data"
LOG, ITEMS = HERE / "example_log.csv", HERE / "example_items.csv"
COLUMNS = EXAMPLE_COLUMNS
# As tests/test_loop.py's, plus every target with at least one earlier item: 600 rows make small stages.
LEARN = {
    "train.lr": 0.03,
    "train.schedule": "constant",
    "train.epochs": 6,
    "train.samples_per_stage": 96,
    "task.min_history": 1,
}


def table_config(
    source: Path, out: Path, columns: str = COLUMNS, meta: Path | None = ITEMS, **sets
) -> RunConfig:
    given = {"data.format": "table", "data.columns": columns, "data.source": str(source), **LEARN, **sets}
    if meta is not None:
        given["data.meta"] = str(meta)
    return tiny_config(source, out, **given)


def test_example_files_are_what_the_script_writes(tmp_path: Path) -> None:
    log, items = write_example(tmp_path)
    assert log.read_bytes() == LOG.read_bytes() and items.read_bytes() == ITEMS.read_bytes()


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory):
    cfg = table_config(LOG, tmp_path_factory.mktemp("runs"))
    return cfg, run_experiment(cfg)


def test_csv_route_learns(csv_run) -> None:
    _, results = csv_run
    frozen, finetune = results
    assert frozen["dataset"] == "example_log" and frozen["complete"] and finetune["complete"]
    assert [s["eval_stage"] for s in frozen["stages"]] == [2, 3]
    # The title decides the rating in the example: a trained model must find it.
    assert frozen["stages"][0]["metrics"]["auc"] > 0.85
    assert set(frozen["data_files"]["files"]) == {"example_log.csv", "example_items.csv"}


def test_parquet_route(csv_run, tmp_path: Path) -> None:
    """The example as Parquet, with real datetime and integer columns: the same samples as the CSV, and a
    run through the whole loop."""
    log = pl.read_csv(LOG).with_columns(pl.col("ts").str.to_datetime("%Y-%m-%dT%H:%M:%S"))
    log.write_parquet(tmp_path / "log.parquet")
    pl.read_csv(ITEMS).write_parquet(tmp_path / "items.parquet")
    sets = {"strategies": "[frozen]", "train.epochs": 2}
    cfg = table_config(tmp_path / "log.parquet", tmp_path / "runs", meta=tmp_path / "items.parquet", **sets)
    csv_cfg, _ = csv_run
    assert prepare_data(cfg).table.df.equals(prepare_data(csv_cfg).table.df)
    (result,) = run_experiment(cfg)
    assert result["complete"] and set(result["data_files"]["files"]) == {"log.parquet", "items.parquet"}
    assert all(0.0 <= s["metrics"]["auc"] <= 1.0 for s in result["stages"])


def test_list_and_record_cells_in_parquet_and_jsonl(tmp_path: Path) -> None:
    """A text field's list (genres) reads as its entries joined; an id, time or rating column of lists or
    records is a one-line error naming the column (polars failed to cast, or a record became an id)."""
    items = pl.read_csv(ITEMS).with_columns(genre=pl.concat_list(pl.col("genre"), pl.lit("kit")))
    items.write_parquet(tmp_path / "items.parquet")
    items.write_ndjson(tmp_path / "items.jsonl")
    columns = COLUMNS.replace("}", ", genre: genre}")
    for meta in ("items.parquet", "items.jsonl"):
        prepared = prepare_data(table_config(LOG, tmp_path / "runs", columns, meta=tmp_path / meta))
        genres = dict(prepared.data.items.select("item_id", "genre").iter_rows())
        assert genres["sku-001"] == "winter, kit" and genres["sku-002"] == "summer, kit"
    log = pl.read_csv(LOG)
    for column, nested in [
        ("iid", pl.concat_list("iid")),  # an item id of lists
        ("uid", pl.struct("uid")),  # a user id of records (it was read as "{'user-01'}")
        ("ts", pl.concat_list("ts")),
        ("stars", pl.concat_list("stars")),
    ]:
        log.with_columns(nested.alias(column)).write_parquet(tmp_path / "log.parquet")
        cfg = table_config(tmp_path / "log.parquet", tmp_path / "runs")
        with pytest.raises(
            DataError, match=rf"log.parquet row 1: column '{column}' holds .* one value per row"
        ):
            prepare_data(cfg)
        # JSON lines read every field as text: the list or record was an id of its JSON text
        log.with_columns(nested.alias(column)).write_ndjson(tmp_path / "log.jsonl")
        cfg = table_config(tmp_path / "log.jsonl", tmp_path / "runs")
        with pytest.raises(
            DataError, match=rf"log.jsonl line 1: field '{column}' holds a .* one value per row"
        ):
            prepare_data(cfg)


def test_json_lines_with_nan_and_infinity(tmp_path: Path) -> None:
    """Python's JSON (pandas' to_json of a missing value too) writes NaN and Infinity: a NaN genre is a gap,
    a NaN or infinite rating a one-line error naming the line (a polars traceback before)."""
    items = pl.read_csv(ITEMS)
    lines = [json.dumps(r) for r in items.to_dicts()]
    lines[1] = json.dumps({**items.row(1, named=True), "genre": float("nan")})
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    columns = COLUMNS.replace("}", ", genre: genre}")
    prepared = prepare_data(table_config(LOG, tmp_path / "runs", columns, meta=tmp_path / "items.jsonl"))
    genres = dict(prepared.data.items.select("item_id", "genre").iter_rows())
    assert genres["sku-001"] == "winter" and genres["sku-002"] is None
    log = pl.read_csv(LOG).to_dicts()
    for value, said in ((float("nan"), "no rating"), (float("inf"), "rating 'Infinity'")):
        rows = [json.dumps(r) for r in log]
        rows[2] = json.dumps({**log[2], "stars": value})
        (tmp_path / "log.jsonl").write_text("\n".join(rows) + "\n")
        with pytest.raises(DataError, match=f"log.jsonl line 3: {said}"):
            prepare_data(table_config(tmp_path / "log.jsonl", tmp_path / "runs"))


def test_json_lines_with_a_nan_parse_the_other_lines_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk holding one NaN was read one line at a time (~8x slower): only the lines holding NaN or
    Infinity take that path now, and the table reads the same."""
    from evolora.data import readers

    log = pl.read_csv(LOG).to_dicts()
    rows = [json.dumps(r) for r in log]
    rows[5] = json.dumps({**log[5], "name": float("nan")})  # a column the run does not read
    (tmp_path / "log.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
    careful = []
    real = readers._parse_lines

    def counted(path, numbered, *rest):
        numbered = list(numbered)
        careful.extend(n for n, _ in numbered)
        return real(path, numbered, *rest)

    monkeypatch.setattr(readers, "_parse_lines", counted)
    got = prepare_data(table_config(tmp_path / "log.jsonl", tmp_path / "runs")).data.interactions
    assert careful == [6]  # the file's line 6 alone
    expected = prepare_data(table_config(tmp_path / "plain.jsonl", tmp_path / "runs")).data.interactions
    assert got.equals(expected) and got.height == len(log)


def test_ids_written_as_numbers_two_ways_or_past_float_precision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'18' beside '18.0' in one file is one number written two ways (part of a column exported as floats):
    read as two users, and said (nothing was). Ids stored as floats past 2^53 have lost digits (30 users read
    as one, float32's past 2^24 too), and so are infinite ones (read as an empty id). A float column with a
    fractional id reads its whole ones as "5.0", as it always did (runs made on such files keep their ids)."""
    log = pl.read_csv(LOG).with_columns(user=(pl.col("uid").rank("dense") + 17).cast(pl.Int64))
    mixed = log.with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0)
        .then(pl.col("user").cast(pl.Utf8) + ".0")
        .otherwise(pl.col("user").cast(pl.Utf8))
        .alias("uid")
    )
    mixed.drop("user").write_csv(tmp_path / "mixed.csv")
    with caplog.at_level("WARNING", logger="evolora"):
        data = prepare_data(table_config(tmp_path / "mixed.csv", tmp_path / "runs")).data
    users = log["user"].n_unique()
    assert data.interactions["user_id"].n_unique() == 2 * users  # as written: two ids each
    assert f"{users} user ids are numbers written two ways in the file (e.g. '18' and '18.0')" in caplog.text
    big = log.with_columns(uid=(pl.col("user") + 1_790_000_000_000_000_000).cast(pl.Float64)).drop("user")
    big.write_parquet(tmp_path / "big.parquet")
    with pytest.raises(
        DataError, match=r"big.parquet row 1: column 'uid' holds ids stored as floating-point"
    ):
        prepare_data(table_config(tmp_path / "big.parquet", tmp_path / "runs"))
    small = log.with_columns(uid=(pl.col("user") + 2**24).cast(pl.Float32)).drop("user")
    small.write_parquet(tmp_path / "f32.parquet")
    with pytest.raises(
        DataError, match=r"column 'uid' holds ids stored as floating-point numbers past 2\^24"
    ):
        prepare_data(table_config(tmp_path / "f32.parquet", tmp_path / "runs"))
    endless = log.with_columns(
        uid=pl.when(pl.int_range(pl.len()) == 4).then(float("inf")).otherwise(pl.col("user").cast(pl.Float64))
    ).drop("user")
    endless.write_parquet(tmp_path / "inf.parquet")
    with pytest.raises(
        DataError, match=r"inf.parquet row 5: column 'uid' holds an infinite number, not an id"
    ):
        prepare_data(table_config(tmp_path / "inf.parquet", tmp_path / "runs"))
    halves = log.with_columns(
        uid=pl.when(pl.col("user") == 18).then(pl.lit(18.5)).otherwise(pl.col("user").cast(pl.Float64))
    ).drop("user")
    halves.write_parquet(tmp_path / "halves.parquet")
    # pandas' astype(str) of a missing id is 'nan': one user of that name, said
    gaps = log.with_columns(uid=pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("nan")).otherwise("uid"))
    gaps.write_csv(tmp_path / "gaps.csv")
    caplog.clear()
    with caplog.at_level("WARNING", logger="evolora"):
        prepare_data(table_config(tmp_path / "gaps.csv", tmp_path / "runs"))
    assert "gaps.csv: 3 rows have the user id 'nan' (how pandas" in caplog.text
    ids = set(
        prepare_data(table_config(tmp_path / "halves.parquet", tmp_path / "runs")).data.interactions[
            "user_id"
        ]
    )
    assert "18.5" in ids and "19.0" in ids and "19" not in ids


def test_files_an_export_gets_wrong_are_said_so(tmp_path: Path) -> None:
    """Each read as text before, with advice that did not help: a UTF-16 export ('expected 4 fields ...
    truncated'), a Parquet file named .csv (a separator), an items table with another separator than the
    log's (its advice and the log's went round in a loop). Ratings stored as a category (pandas') read."""
    text = LOG.read_text()
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match=r"utf16.csv: the file is UTF-16 text .*save it as UTF-8"):
        prepare_data(table_config(tmp_path / "utf16.csv", tmp_path / "runs"))
    pl.read_csv(LOG).write_parquet(tmp_path / "parquet.csv")
    with pytest.raises(DataError, match=r"parquet\.csv: the file is a Parquet file: name it \.parquet"):
        prepare_data(table_config(tmp_path / "parquet.csv", tmp_path / "runs"))
    pl.read_csv(ITEMS).write_csv(tmp_path / "items.csv", separator=";")
    with pytest.raises(DataError) as said:
        prepare_data(table_config(LOG, tmp_path / "runs", meta=tmp_path / "items.csv"))
    assert (
        "its fields look separated by ';', while data.separator ',' reads the log example_log.csv"
        in str(said.value)
        and "write the items table with ','" in str(said.value)
        and "set data.separator" not in str(said.value)
    )
    log = pl.read_csv(LOG)
    log.with_columns(pl.col("stars").cast(pl.Utf8).cast(pl.Categorical)).write_parquet(
        tmp_path / "cat.parquet"
    )
    data = prepare_data(table_config(tmp_path / "cat.parquet", tmp_path / "runs")).data
    assert sorted(data.interactions["rating"].unique()) == sorted(log["stars"].cast(pl.Float64).unique())


def test_a_tsv_quoted_as_csv_and_a_json_array_are_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A .tsv written with CSV's quoting (pandas' to_csv(sep='\\t') of a title holding a quote) kept the
    quotes in the title without a word; a JSON array in a .jsonl file was 'expected a JSON object'."""
    log = pl.read_csv(LOG)
    titles = pl.read_csv(ITEMS).with_columns(
        name=pl.when(pl.col("iid") == "sku-002").then(pl.lit('"12"" Vinyl"')).otherwise("name")
    )
    lines = ["iid\tname"] + [f"{i}\t{n}" for i, n in titles.select("iid", "name").iter_rows()]
    (tmp_path / "items.tsv").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="evolora"):
        data = prepare_data(table_config(LOG, tmp_path / "runs", meta=tmp_path / "items.tsv")).data
    said = "items.tsv: column 'name': 1 value is wrapped in double quotes as CSV writes them (line 3"
    assert said in caplog.text and "a .tsv file has no quoting" in caplog.text
    assert dict(data.items.select("item_id", "title").iter_rows())["sku-002"] == '"12"" Vinyl"'  # as written
    (tmp_path / "log.jsonl").write_text(json.dumps(log.to_dicts()) + "\n")
    with pytest.raises(DataError, match=r"log.jsonl line 1: .*looks like one JSON array"):
        prepare_data(table_config(tmp_path / "log.jsonl", tmp_path / "runs"))


def test_explicit_labels(tmp_path: Path) -> None:
    """A 0/1 column is the label itself: no threshold, no sampled negatives."""
    log = pl.read_csv(LOG).with_columns(clicked=(pl.col("stars") > 3).cast(pl.Int8)).drop("stars")
    log.write_csv(tmp_path / "log.csv")
    columns = "{user: uid, item: iid, time: ts, label: clicked, title: name}"
    prepared = prepare_data(table_config(tmp_path / "log.csv", tmp_path / "runs", columns))
    assert prepared.data.like_threshold == 0.5 and not prepared.data.implicit
    df = prepared.table.df
    assert not df["sampled"].any()
    # Each sample's label is the file's 0/1 (a user buys a product once in the example).
    file_labels = log.select(user_id="uid", item_id="iid", clicked="clicked")
    joined = df.join(file_labels, on=["user_id", "item_id"], how="left")
    assert joined.height == df.height and (joined["label"] == joined["clicked"]).all()


def test_a_label_column_of_one_value_and_a_next_item_run_on_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A label column of 1s alone was told to set data.like_threshold, which a label column refuses; a
    next-item run took the rows labelled 0 (shown, not chosen) as interactions without a word, and
    data.min_rating, the way to keep the 1s, was refused for a table without a rating column."""
    log = pl.read_csv(LOG).with_columns(clicked=(pl.col("stars") > 3).cast(pl.Int8)).drop("stars")
    log.with_columns(clicked=pl.lit(1)).write_csv(tmp_path / "ones.csv")
    columns = "{user: uid, item: iid, time: ts, label: clicked, title: name}"
    with pytest.raises(
        DataError, match=r"every sample is a like \(the label column 'clicked'\).*holds both 0 and 1"
    ):
        prepare_data(table_config(tmp_path / "ones.csv", tmp_path / "runs", columns))
    log.write_csv(tmp_path / "log.csv")
    next_item = {"task.name": "next_item", "task.template": "peso", "protocol": "leave_last_out"}
    with caplog.at_level("WARNING", logger="evolora"):
        every = prepare_data(table_config(tmp_path / "log.csv", tmp_path / "runs", columns, **next_item))
    assert "run reads every row as an interaction, those labelled 0 in 'clicked' too" in caplog.text
    kept = prepare_data(
        table_config(tmp_path / "log.csv", tmp_path / "runs", columns, **next_item, **{"data.min_rating": 1})
    )
    assert kept.data.interactions.height == int(log["clicked"].sum()) < every.data.interactions.height


def test_a_label_run_takes_labels_in_a_query(tmp_path: Path) -> None:
    """A history's ratings for a run on a 0/1 label column are labels: 0 or 1, or true/false as the column
    may hold them (true was refused as no number, 0.3 read as a dislike without a word)."""
    import evolora
    from evolora.errors import EvoloraError

    log = pl.read_csv(LOG).with_columns(clicked=(pl.col("stars") > 3).cast(pl.Int8)).drop("stars")
    log.write_csv(tmp_path / "log.csv")
    columns = "{user: uid, item: iid, time: ts, label: clicked, title: name}"
    cfg = table_config(tmp_path / "log.csv", tmp_path / "runs", columns, strategies="[frozen]")
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    rec = evolora.Recommender.load(root)
    a, b, c = log["iid"].unique(maintain_order=True).head(3).to_list()
    as_labels = rec.score([(a, True), (b, False)], [c])
    assert as_labels == rec.score([(a, 1), (b, 0)], [c])
    with pytest.raises(EvoloraError, match=r"this run's data has labels \('clicked'\): give 0 or 1"):
        rec.score([(a, 0.3)], [c])
    said = CliRunner().invoke(app, ["recommend", str(root), "--history", f"{a}:true,{b}:false", "--items", c])
    assert said.exit_code == 0, said.output
    assert f"{as_labels[0].score:.4f}" in said.output


# ------------------------------------------------------------------------------------ implicit feedback


def implicit_config(tmp_path: Path, **sets) -> RunConfig:
    pl.read_csv(LOG).drop("stars").write_csv(tmp_path / "clicks.csv")
    return table_config(
        tmp_path / "clicks.csv", tmp_path / "runs", "{user: uid, item: iid, time: ts, title: name}", **sets
    )


def test_implicit_ctr_gets_sampled_negatives(tmp_path: Path) -> None:
    prepared = prepare_data(implicit_config(tmp_path, **{"data.negatives": 2, "data.negative_seed": 5}))
    assert prepared.data.implicit
    df = prepared.table.df.with_row_index("row")
    real, sampled = df.filter(~pl.col("sampled")), df.filter(pl.col("sampled"))
    assert (real["label"] == 1).all() and (sampled["label"] == 0).all()
    # Every user bought 20 of 40 products, so every sample has enough items left for its 2 negatives.
    assert sampled.height == 2 * real.height
    # Each negative follows its positive and copies its user, history, stage and time.
    same = ["user_id", "timestamp", "stage", "hist_items", "hist_ratings", "user_kind"]
    for k in (1, 2):
        after = df.filter(pl.col("row").is_in((real["row"] + k).implode()))
        assert after["sampled"].all() and after.select(same).equals(real.select(same))
    # A negative is an item the user had not met by then, known in the data by then.
    inter = prepared.data.interactions
    first = inter.group_by("user_id", "item_id").agg(pl.col("timestamp").min().alias("met"))
    met = sampled.join(first, on=["user_id", "item_id"], how="left")
    assert (met["met"].is_null() | (met["met"] > met["timestamp"])).all()
    seen = inter.group_by("item_id").agg(pl.col("timestamp").min().alias("seen"))
    assert (sampled.join(seen, on="item_id")["seen"] <= sampled["timestamp"]).all()
    # Histories hold real interactions only.
    real_pairs = set(inter.select("user_id", "item_id").iter_rows())
    hist_pairs = df.select("user_id", "hist_items").explode("hist_items").drop_nulls().iter_rows()
    assert set(hist_pairs) <= real_pairs
    # leave_last_out keeps a positive and its negatives in one pool.
    pools = split_pools(prepared.table, "leave_last_out")
    for p in pools.values():
        assert len(p.test) == 3 * (~df["sampled"].to_numpy()[p.test]).sum()


def test_sampled_negatives_are_reproducible(tmp_path: Path) -> None:
    cfg = implicit_config(tmp_path)
    first, again = prepare_data(cfg).table.df, prepare_data(cfg).table.df
    assert first.equals(again)
    other = prepare_data(implicit_config(tmp_path, **{"data.negative_seed": 1})).table.df
    assert first.height == other.height and not first["item_id"].equals(other["item_id"])
    assert first.filter(~pl.col("sampled")).equals(other.filter(~pl.col("sampled")))


def test_next_item_gets_no_negatives(tmp_path: Path) -> None:
    ctr = prepare_data(implicit_config(tmp_path)).table.df
    cfg = implicit_config(
        tmp_path, **{"task.name": "next_item", "task.template": "peso", "task.history_len": 5}
    )
    df = prepare_data(cfg).table.df
    assert not df["sampled"].any() and df.height == (~ctr["sampled"]).sum()


def test_implicit_without_negatives_is_refused_for_ctr(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.negatives is 0, so the ctr task would have no negative"):
        prepare_data(implicit_config(tmp_path, **{"data.negatives": 0}))


def test_implicit_run_end_to_end(tmp_path: Path) -> None:
    cfg = implicit_config(tmp_path, **{"strategies": "[frozen]", "train.epochs": 2})
    (result,) = run_experiment(cfg)
    aucs = [s["metrics"]["auc"] for s in result["stages"]]
    assert result["complete"] and all(np.isfinite(aucs))


def test_data_info_on_a_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rich.console import Console

    monkeypatch.setattr("evolora.cli.console", Console(width=200))
    args = [
        "data",
        "info",
        str(LOG),
        "--format",
        "table",
        "--meta",
        str(ITEMS),
        "--set",
        f"data.columns={COLUMNS}",
    ]
    result = CliRunner().invoke(app, [*args, "--set", "staging.n_stages=3"])
    assert result.exit_code == 0, result.output
    assert "example_log" in result.output and "2024-01-01" in result.output
    # Stage 1 holds the log's first 200 rows (README, Your own data): its share of stars above 3.
    first = pl.read_csv(LOG).sort("ts", maintain_order=True).head(200)
    assert "liked" in result.output and f"{(first['stars'] > 3).mean():.4f}" in result.output
    # An implicit log has no ratings, so no liked share.
    pl.read_csv(LOG).drop("stars").write_csv(tmp_path / "clicks.csv")
    clicks = [tmp_path / "clicks.csv" if a == str(LOG) else a for a in args]
    columns = "data.columns={user: uid, item: iid, time: ts, title: name}"
    clicks = [str(a) if a != f"data.columns={COLUMNS}" else columns for a in clicks]
    result = CliRunner().invoke(app, clicks)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "new users" in line)
    assert "liked" not in header
    result = CliRunner().invoke(app, ["data", "info", str(LOG)])
    assert result.exit_code == 2 and "set data.format: table and data.columns" in result.output


# ------------------------------------------------------------------------------------ the log's own stages


def test_a_stage_column_stages_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Stages cut at release dates (two months each), not in equal counts: the run's stages are the file's."""
    from rich.console import Console

    monkeypatch.setattr("evolora.cli.console", Console(width=200))
    log = pl.read_csv(LOG).with_columns(
        release=(pl.col("ts").str.slice(5, 2).cast(pl.Int32) + 1) // 2  # Jan-Feb 1, Mar-Apr 2, May-Jun 3
    )
    log.write_csv(tmp_path / "log.csv")
    columns = COLUMNS.replace("}", ", stage: release}")
    sets = {"staging.scheme": "auto", "strategies": "[frozen]", "train.epochs": 1}
    cfg = table_config(tmp_path / "log.csv", tmp_path / "runs", columns, **sets)
    prepared = prepare_data(cfg)
    per_file = log.group_by("release").len().sort("release")["len"].to_list()
    per_stage = prepared.staged.group_by("stage").len().sort("stage")["len"].to_list()
    assert per_stage == per_file and per_file != [200, 200, 200]  # not the equal-count cut
    (result,) = run_experiment(cfg)
    assert result["complete"] and [s["eval_stage"] for s in result["stages"]] == [2, 3]
    # `auto` resolved to the file's stages, and each stage was judged on the file's stage's samples
    recorded = json.loads((Path(cfg.output_dir) / cfg.name / "experiment.json").read_text())
    assert recorded["context"]["staging"]["scheme"] == "preset"
    assert [s["n_eval_total"] for s in result["stages"]] == [len(prepared.pools[t].test) for t in (2, 3)]
    info = ["data", "info", str(tmp_path / "log.csv"), "--format", "table", "--meta", str(ITEMS)]
    shown = CliRunner().invoke(app, [*info, "--set", f"data.columns={columns}"])
    assert shown.exit_code == 0 and "stages (preset, 3)" in shown.output, shown.output
    assert "2024-03-01" in shown.output  # the dates of a table's stages are real ones
    # `data info CONFIG.yaml` reads the config's data, as `evolora run CONFIG.yaml` does
    config = tmp_path / "staged.yaml"
    config.write_text(
        f"data: {{source: {tmp_path / 'log.csv'}, format: table, meta: {ITEMS}, columns: {columns}}}\n"
    )
    from_config = CliRunner().invoke(app, ["data", "info", str(config)])
    assert from_config.exit_code == 0 and "stages (preset, 3)" in from_config.output, from_config.output


def test_a_stage_column_of_one_stage_is_refused_before_training(tmp_path: Path) -> None:
    """next_stage evaluates each stage's model on the next: one stage leaves nothing to evaluate (the run
    trained, then its report failed on no evaluated stage)."""
    pl.read_csv(LOG).with_columns(release=pl.lit(1)).write_csv(tmp_path / "log.csv")
    columns = COLUMNS.replace("}", ", stage: release}")
    sets = {"staging.scheme": "auto", "staging.n_stages": "null", "strategies": "[frozen]"}
    cfg = table_config(tmp_path / "log.csv", tmp_path / "runs", columns, **sets)
    with pytest.raises(DataError, match=r"comes with one stage, and protocol: next_stage .* at least 2"):
        run_experiment(cfg)
    assert not (tmp_path / "runs" / cfg.name / "frozen").exists()


def test_binary_parquet_columns_are_text_under_the_encoding_policy(tmp_path: Path) -> None:
    """Strings some writers store as bytes: an id that is not UTF-8 is an error naming its row (it was a
    traceback); a text field's bad bytes are replaced, as in CSV."""
    log = pl.read_csv(LOG)
    as_bytes = pl.col("uid").cast(pl.Binary)
    log.with_columns(as_bytes).write_parquet(tmp_path / "ok.parquet")
    assert prepare_data(table_config(tmp_path / "ok.parquet", tmp_path / "runs")).data.interactions.height > 0
    bad = pl.Series("uid", [b"\xff\xfe", *log["uid"].cast(pl.Binary).to_list()[1:]], dtype=pl.Binary)
    log.with_columns(bad).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 1: column 'uid' is not valid UTF-8"):
        prepare_data(table_config(tmp_path / "bad.parquet", tmp_path / "runs"))


def test_ids_apart_only_by_spaces_at_their_ends_are_said_to_become_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ids are read without spaces at their ends: where that makes two ids of the file one ("u1" and "u1 "),
    a warning says so; spaces alone (every id padded alike) are no news."""
    log = pl.read_csv(LOG)
    first = log["uid"][0]
    log.with_columns(pl.col("uid") + " ").write_csv(tmp_path / "padded.csv")
    with caplog.at_level("WARNING", logger="evolora"):
        padded = prepare_data(table_config(tmp_path / "padded.csv", tmp_path / "runs"))
    assert "spaces at their ends" not in caplog.text
    assert first in padded.data.interactions["user_id"].to_list()
    some = pl.int_range(pl.len()) % 2 == 0
    log.with_columns(pl.when(some).then(pl.col("uid") + " ").otherwise(pl.col("uid"))).write_csv(
        tmp_path / "mixed.csv"
    )
    with caplog.at_level("WARNING", logger="evolora"):
        mixed = prepare_data(table_config(tmp_path / "mixed.csv", tmp_path / "runs"))
    assert "user ids differ from others only by spaces at their ends" in caplog.text
    assert mixed.data.interactions["user_id"].n_unique() == log["uid"].n_unique()
    assert f"(e.g. '{log['uid'][0]} ' and '{log['uid'][0]}')" in caplog.text  # two forms of one id
    # a query's id is the run's as given where the run has it so (a loader that keeps spaces), else stripped
    from evolora.data.ids import known_form

    assert (
        known_form(" 0 ", {" 0 "}) == " 0 "
        and known_form(" 0 ", {"0"}) == "0"
        and known_form(7, {"7"}) == "7"
    )
    assert known_form("a\x1f ", {"a\x1f"}) == "a\x1f"  # (not a space: kept, as the loader keeps it)


def test_a_time_column_mixing_units_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Seconds and milliseconds in one column read as 1970 beside 2024 under either unit: an error naming
    both lines (with data.time_unit: ms, as the error for the first millisecond value advises, it passed)."""
    log = pl.read_csv(LOG).sort("ts")
    seconds = pl.col("ts").str.to_datetime().dt.epoch("s")
    mixed = log.with_columns(pl.when(pl.int_range(pl.len()) < 300).then(seconds).otherwise(seconds * 1000))
    mixed.write_csv(tmp_path / "mixed.csv")
    with pytest.raises(DataError, match=r"line 2: time .* reads as 1970-.* as 2024-.*mixes units"):
        prepare_data(table_config(tmp_path / "mixed.csv", tmp_path / "runs", **{"data.time_unit": "ms"}))
    # yyyymmdd numbers are no epoch: they load (as 1970), with a warning saying how to write them
    log.with_columns(pl.col("ts").str.slice(0, 10).str.replace_all("-", "")).write_csv(tmp_path / "ymd.csv")
    with caplog.at_level("WARNING", logger="evolora"):
        prepare_data(table_config(tmp_path / "ymd.csv", tmp_path / "runs", **{"task.min_history": 0}))
    assert "look like yyyymmdd dates" in caplog.text


def test_a_time_in_another_unit_gets_advice_the_reader_can_follow(tmp_path: Path) -> None:
    """Milliseconds read as seconds: a run is told to set data.time_unit; an update's batch, whose unit is
    the run's and cannot change, is told to write its times in that unit (and only inside the context)."""
    from evolora.data.times import settings_fixed

    log = pl.read_csv(LOG).with_columns(pl.col("ts").str.to_datetime().dt.epoch("ms"))
    log.write_csv(tmp_path / "ms.csv")
    cfg = table_config(tmp_path / "ms.csv", tmp_path / "runs")
    with pytest.raises(DataError, match=r"it looks like epoch milliseconds: set data\.time_unit: ms$"):
        prepare_data(cfg)
    with settings_fixed(), pytest.raises(DataError) as refused:
        prepare_data(cfg)
    said = str(refused.value)
    assert "it looks like epoch milliseconds: this run reads data.time_unit: s, so write" in said
    assert "set data.time_unit" not in said
    with pytest.raises(DataError, match=r"set data\.time_unit: ms$"):
        prepare_data(cfg)


def test_upper_case_gz_is_decompressed(tmp_path: Path) -> None:
    import gzip

    log = pl.read_csv(LOG)
    (tmp_path / "LOG.JSONL.GZ").write_bytes(gzip.compress(log.write_ndjson().encode()))
    data = prepare_data(table_config(tmp_path / "LOG.JSONL.GZ", tmp_path / "runs")).data
    assert data.interactions.height == log.height
    # gzip under a plain .csv name (its separator was guessed from the compressed bytes: "set data.separator")
    (tmp_path / "log.csv").write_bytes(gzip.compress(LOG.read_bytes()))
    data = prepare_data(table_config(tmp_path / "log.csv", tmp_path / "runs2")).data
    assert data.interactions.height == log.height
    (tmp_path / "log.jsonl").write_bytes(gzip.compress(log.write_ndjson().encode()))  # and JSON lines
    data = prepare_data(table_config(tmp_path / "log.jsonl", tmp_path / "runs3")).data
    assert data.interactions.height == log.height


def test_an_items_table_without_a_mapped_title_calls_items_by_their_id(tmp_path: Path) -> None:
    """No data.columns.title beside a data.meta whose records miss a logged item: the items are called by
    their id (the title expression was a one-row literal beside the table: a polars ShapeError)."""
    items = pl.read_csv(ITEMS)
    (tmp_path / "items.csv").write_text(items[1:].write_csv())  # the first item has no record
    columns = "{user: uid, item: iid, time: ts, rating: stars, genre: genre}"
    cfg = table_config(LOG, tmp_path / "runs", columns=columns, meta=tmp_path / "items.csv")
    data = prepare_data(cfg).data
    assert data.items["title"].to_list() == data.items["item_id"].to_list()
    assert data.items.height == items.height
