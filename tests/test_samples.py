"""Samples and protocol pools: histories, user kinds, splits, and no time leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from evolora.config import DataConfig, StagingConfig
from evolora.data import assign_stages, load_dataset
from evolora.data.negatives import add_sampled_negatives
from evolora.data.samples import SampleTable, build_samples, draw, eval_stage_of, split_pools, train_stages
from evolora.errors import DataError
from tests.helpers import staged_frame


def test_history_is_the_latest_items_across_stages() -> None:
    rows = [
        ("u", f"i{k}", 5.0 if k % 2 else 1.0, 10 * k, 0 if k < 2 else 1 if k < 5 else 2) for k in range(7)
    ]
    table = build_samples(staged_frame(rows), n_stages=2, like_threshold=3.0, history_len=3, min_history=2)
    df = table.df
    # i0, i1 are history only (stage 0); i2..i6 are targets with at least 2 earlier items.
    assert df["item_id"].to_list() == ["i2", "i3", "i4", "i5", "i6"]
    assert df["hist_items"].to_list()[0] == ["i0", "i1"]
    assert df["hist_items"].to_list()[3] == ["i2", "i3", "i4"]  # capped at 3, oldest first, crosses stages
    assert df["hist_ratings"].to_list()[3] == [1.0, 5.0, 1.0]
    assert df["label"].to_list() == [0, 1, 0, 1, 0]
    assert df["stage"].to_list() == [1, 1, 1, 2, 2]


@pytest.mark.parametrize("history_len", [1, 4, 30])
@pytest.mark.parametrize("same_time", ["log_order", "exclude"])
def test_histories_are_what_a_scan_of_each_users_log_gives(history_len: int, same_time: str) -> None:
    """Every sample's history against a plain per-user scan, on a random log with tied timestamps (file
    order breaks them, or `exclude` leaves a user's same-time interactions out of each other's histories),
    users of one to ~40 interactions and items met more than once."""
    rng = np.random.default_rng(history_len)
    n = 600
    users = rng.choice([f"u{k}" for k in range(40)], size=n, p=np.r_[[0.2], np.full(39, 0.8 / 39)])
    times = rng.integers(0, 50, size=n)  # many ties
    rows = [
        (str(u), f"i{int(rng.integers(25))}", float(rng.integers(1, 6)), int(t), int(t) // 17)
        for u, t in zip(users, times, strict=True)
    ]
    table = build_samples(
        staged_frame(rows), n_stages=2, like_threshold=3.0, history_len=history_len, min_history=0,
        same_time=same_time,
    )  # fmt: skip
    by_user: dict[str, list[tuple[int, int, str, float, int]]] = {}
    for row_no, (u, i, r, t, stage) in enumerate(rows):
        by_user.setdefault(u, []).append((t, row_no, i, r, stage))
    expected = []
    for log in by_user.values():
        log.sort()
        for pos, (t, row_no, i, _, stage) in enumerate(log):
            if stage >= 1:
                every = [b for b in log[:pos] if same_time == "log_order" or b[0] < t]
                before = every[-history_len:]
                items = [b[2] for b in before]
                expected.append(((t, row_no), i, items, [b[3] for b in before], [b[2] for b in every]))
    expected.sort(key=lambda e: e[0])
    df = table.df
    assert df["item_id"].to_list() == [e[1] for e in expected]
    assert df["hist_items"].to_list() == [e[2] for e in expected]
    assert df["hist_ratings"].to_list() == [e[3] for e in expected]
    # what `task.exclude_history: rated` leaves out: the same scan without the history_len cut
    assert table.rated_before(np.arange(df.height)) == [e[4] for e in expected]
    shuffled = np.random.default_rng(0).permutation(df.height)
    assert table.rated_before(shuffled) == [expected[r][4] for r in shuffled]
    mapping = {f"i{k}": k + 1 for k in range(20)}  # i20..i24 have no index: 0
    index = table.rated_before_index(mapping)
    assert index is not None
    flat, start, count = index
    for r, e in enumerate(expected):
        assert flat[start[r] : start[r] + count[r]].tolist() == [mapping.get(i, 0) for i in e[4]]


def test_a_log_of_one_row_has_one_sample_without_history() -> None:
    """The degenerate log (polars 1.28, the floor, panics on a one-row rolling window)."""
    table = build_samples(staged_frame([("u", "i", 5.0, 1, 1)]), 1, 3.0, history_len=4, min_history=0)
    assert table.df["hist_items"].to_list() == [[]] and table.df["hist_ratings"].to_list() == [[]]
    assert table.df.schema["hist_items"] == pl.List(pl.Utf8)


def test_min_history_skips_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    rows = [("u", f"i{k}", 4.0, k, 1 if k < 4 else 2) for k in range(8)] + [("v", "i0", 4.0, 100, 2)]
    with caplog.at_level("INFO", logger="evolora.data"):
        table = build_samples(staged_frame(rows), 2, 3.0, history_len=5, min_history=3)
    assert len(table) == 5  # u's items 3..7; v has no history
    assert "4 of 9 staged interactions" in caplog.text


def test_empty_stage_after_history_filter_is_an_error() -> None:
    rows = [("u", f"i{k}", 4.0, k, 1) for k in range(5)] + [("v", "x", 4.0, 99, 2)]
    with pytest.raises(DataError, match=r"stages \[2\]"):
        build_samples(staged_frame(rows), 2, 3.0, history_len=3, min_history=3)


def test_user_kinds() -> None:
    rows = [
        ("a", "1", 4.0, 1, 1), ("a", "2", 4.0, 2, 1), ("a", "3", 4.0, 10, 2), ("a", "4", 4.0, 20, 3),
        ("b", "1", 4.0, 3, 1), ("b", "2", 4.0, 4, 1), ("b", "3", 4.0, 21, 3),
        ("c", "1", 4.0, 22, 3), ("c", "2", 4.0, 23, 3),
    ]  # fmt: skip
    table = build_samples(staged_frame(rows), 3, 3.0, history_len=2, min_history=1)
    kinds = {(r["user_id"], r["item_id"]): r["user_kind"] for r in table.df.iter_rows(named=True)}
    assert kinds[("a", "3")] == "active"  # seen in stage 1, target in stage 2
    assert kinds[("a", "4")] == "active"
    assert kinds[("b", "3")] == "dormant"  # seen in stage 1, absent in 2, back in 3
    assert kinds[("c", "2")] == "new"


@pytest.fixture(scope="module")
def ml_table(request: pytest.FixtureRequest):
    sunny = request.getfixturevalue("sunny_dir")
    data = load_dataset(DataConfig(source=str(sunny)))
    staged = assign_stages(data.interactions, StagingConfig(scheme="lsat", n_stages=4))
    return build_samples(staged, 4, 3.0, history_len=5, min_history=5)


def test_next_stage_protocol_has_no_time_leakage(ml_table) -> None:
    pools = split_pools(ml_table, "next_stage", valid_fraction=0.1)
    ts = ml_table.df["timestamp"].to_numpy()
    for t in train_stages("next_stage", 4):
        e = eval_stage_of(t, "next_stage")
        train_valid = np.concatenate([pools[t].train, pools[t].valid])
        assert ts[train_valid].max() < ts[pools[e].test].min()
        # validation is the chronological tail of the stage
        assert ts[pools[t].train].max() <= ts[pools[t].valid].min()
    total = sum(len(pools[s].test) for s in pools)
    assert total == len(ml_table)
    assert all(len(pools[s].train) + len(pools[s].valid) == len(pools[s].test) for s in pools)


def test_leave_last_out_protocol(ml_table) -> None:
    pools = split_pools(ml_table, "leave_last_out")
    df = ml_table.df.with_row_index("i")
    for s, p in pools.items():
        part = df.filter(pl.col("stage") == s)
        users = part["user_id"].unique()
        assert len(p.test) == len(users)  # one test sample per active user
        last = part.group_by("user_id").agg(pl.col("i").max())["i"].to_numpy()
        assert set(p.test.tolist()) == set(last.tolist())
        assert len(p.train) + len(p.valid) + len(p.test) == part.height
        assert not set(p.train) & set(p.valid) and not set(p.valid) & set(p.test)


def test_draw_is_reproducible_sorted_and_keyed() -> None:
    rows = np.arange(100, 200)
    a = draw(rows, 10, seed=0, stage=2, salt=0)
    assert np.array_equal(a, draw(rows, 10, seed=0, stage=2, salt=0))
    assert np.all(np.diff(a) > 0) and set(a) <= set(rows)
    assert not np.array_equal(a, draw(rows, 10, seed=1, stage=2, salt=0))
    assert not np.array_equal(a, draw(rows, 10, seed=0, stage=3, salt=0))
    assert np.array_equal(draw(rows, None, 0, 1, 0), rows)
    assert np.array_equal(draw(rows, 500, 0, 1, 0), rows)


def test_every_built_sample_is_real() -> None:
    rows = [("u", f"i{k}", 4.0, k, 1) for k in range(4)]
    df = build_samples(staged_frame(rows), 1, 3.0, history_len=2, min_history=1).df
    assert df["sampled"].dtype == pl.Boolean and not df["sampled"].any()


def test_sampled_negatives_are_items_not_met_yet(caplog: pytest.LogCaptureFixture) -> None:
    """Known items by time t are those anyone met at or before t; the user's own ones are left out."""
    rows = [
        ("v", "a", 1.0, 0, 0),
        ("u", "b", 1.0, 1, 0),
        ("u", "c", 1.0, 2, 1),  # known: a, b, c; u met b, c -> a only (one short of 2)
        ("u", "a", 1.0, 3, 1),  # known: a, b, c; u met all -> none
        ("v", "d", 1.0, 50, 1),  # known: a, b, c, d; v met a, d -> b and c
    ]
    staged = staged_frame(rows)
    table = build_samples(staged, 1, 0.5, history_len=3, min_history=1)
    with caplog.at_level("INFO", logger="evolora.data"):
        df = add_sampled_negatives(table, staged, 2, seed=3).df
    got = df.select("user_id", "item_id", "timestamp", "label", "sampled").rows()
    assert got[:3] == [("u", "c", 2, 1, False), ("u", "a", 2, 0, True), ("u", "a", 3, 1, False)]
    assert got[3] == ("v", "d", 50, 1, False) and sorted(r[1] for r in got[4:]) == ["b", "c"]
    assert all(r[3:] == (0, True) for r in got[4:]) and len(got) == 6
    assert df["hist_items"].to_list()[:2] == [["b"], ["b"]]  # a negative keeps its positive's history
    assert "sampled negatives: 3 for 3 implicit-feedback samples (2 per sample, seed 3)" in caplog.text
    assert "2 samples got fewer" in caplog.text
    # leave_last_out: v's positive and its negatives are all the test of stage 1 for v.
    pools = split_pools(SampleTable(df, 1, 3, 0.5), "leave_last_out")
    assert sorted(pools[1].test.tolist()) == [2, 3, 4, 5]


def test_budgets_larger_than_a_pool_are_warned_about(
    sunny_dir, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from evolora.data.prepare import prepare_data
    from tests.helpers import tiny_config

    big = {"train.samples_per_stage": 100_000, "train.valid_samples": 8, "eval.max_samples": "null"}
    with caplog.at_level("WARNING", logger="evolora"):
        prepared = prepare_data(tiny_config(sunny_dir, tmp_path, **big))
    train = [f"stage {s}: {len(prepared.pools[s].train)} of 100000" for s in (1, 2)]  # stage 3 only tests
    assert (
        f"train.samples_per_stage asks for more samples than the train pool holds ({'; '.join(train)})"
        in (caplog.text)
    )
    assert "valid_samples" not in caplog.text and "max_samples" not in caplog.text


def test_hold_out_histories_with_stages_next_is_said_to_change_nothing(
    sunny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from evolora.data.prepare import prepare_data
    from tests.helpers import tiny_config

    with caplog.at_level("WARNING", logger="evolora"):
        prepare_data(tiny_config(sunny_dir, tmp_path, **{"eval.hold_out_histories": True}))
    assert "eval.hold_out_histories is for eval.stages seen or all" in caplog.text


def test_ctr_on_a_release_without_ratings_gets_negatives(tmp_path) -> None:
    # PESO's release is implicit feedback: every interaction a like. CTR samples on it would all be
    # positives (AUC undefined, a model that answers "yes" to everything) without sampled negatives.
    from evolora.data.prepare import prepare_data
    from tests.helpers import tiny_config, write_peso_cycle

    cfg = tiny_config(write_peso_cycle(tmp_path / "cycle"), tmp_path, **{"staging.scheme": "preset"})
    df = prepare_data(cfg).table.df
    assert set(df["label"].to_list()) == {0, 1} and df["sampled"].sum() == (df["label"] == 0).sum()


def test_a_stage_of_one_label_is_warned_about(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from evolora.data.prepare import prepare_data
    from tests.helpers import EXAMPLE_DATA, EXAMPLE_TABLE, tiny_config

    log = pl.read_csv(EXAMPLE_DATA / "example_log.csv")
    first = log["ts"].sort()[len(log) // 3]
    liked = log.with_columns(pl.when(pl.col("ts") < first).then(5).otherwise(pl.col("stars")).alias("stars"))
    liked.write_csv(tmp_path / "log.csv")  # every rating of the first third (stage 1) is a like
    with caplog.at_level("WARNING", logger="evolora"):
        prepared = prepare_data(tiny_config(tmp_path / "log.csv", tmp_path / "runs", **EXAMPLE_TABLE))
    labels = prepared.table.df.group_by("stage").agg(pl.col("label").n_unique()).sort("stage")
    assert labels["label"].to_list() == [1, 2, 2]
    assert "stage 1: every sample has the same label (rating > data.like_threshold 3" in caplog.text


def test_an_empty_stage_says_why(sunny_dir) -> None:
    """Stage shares that leave a stage no rows say so; a tie of timestamps is named only when there is one."""
    data = load_dataset(DataConfig(source=str(sunny_dir)))
    n = data.interactions.height
    distinct = data.interactions.with_columns(timestamp=pl.int_range(n, dtype=pl.Int64) + 1_700_000_000)
    ratios = StagingConfig(scheme="global", ratios=[1 - 2 / n, 0.5 / n, 1.5 / n], n_stages=None)
    with pytest.raises(
        DataError,
        match=rf"stage 2 is empty: its share of the {n} interactions rounds to none; give it a larger part "
        r"of staging\.ratios",
    ):
        assign_stages(distinct, ratios)
    tied = data.interactions.with_columns(timestamp=pl.lit(1_700_000_000, dtype=pl.Int64))
    with pytest.raises(DataError, match=rf"{n} interactions share timestamp 1700000000"):
        assign_stages(tied, StagingConfig(scheme="lsat", n_stages=3))


def test_a_time_window_fixes_the_bins_as_lsat_amazon_setup_does(caplog) -> None:
    """staging.window: [start, end) in equal time bins, whatever the data's first and last dates; earlier
    interactions are history, later ones left out and counted."""
    import logging

    day = 86_400
    start = 1_393_632_000  # 2014-03-01 UTC
    times = [start - 5 * day, start, start + 9 * day, start + 10 * day, start + 19 * day, start + 20 * day]
    rows = [("u", f"i{k}", 4.0, t, 0) for k, t in enumerate(times)]
    df = staged_frame(rows).drop("stage")
    cfg = StagingConfig(scheme="lsat", by="time", n_stages=2, window=("2014-03-01", "2014-03-21"))
    with caplog.at_level(logging.INFO, logger="evolora.data"):
        staged = assign_stages(df, cfg)
    assert staged["stage"].to_list() == [0, 1, 1, 2, 2]  # the 20th day's interaction is past the end
    assert "1 interactions at or after the window's end left out" in caplog.text
    for bad, message in [
        ({"by": "count"}, "by: time"),
        ({"window": ("2014-03-21", "2014-03-01")}, "is not before"),
        ({"window": ("March 2014", "2014-03-21")}, "not an ISO date"),
    ]:
        with pytest.raises(ValueError, match=message):
            StagingConfig(**{"scheme": "lsat", "by": "time", "n_stages": 2, "window": cfg.window, **bad})
    with pytest.raises(DataError, match="stage 2 is empty"):
        assign_stages(df, cfg.model_copy(update={"window": ("2014-03-01", "2015-03-01")}))
    # YAML reads an unquoted date as a date: the same window
    import datetime

    dates = [datetime.date(2014, 3, 1), datetime.date(2014, 3, 21)]
    assert StagingConfig(scheme="lsat", by="time", n_stages=2, window=dates).window_seconds() == (
        start,
        start + 20 * day,
    )


def test_same_time_interactions_are_no_history_for_each_other_when_excluded() -> None:
    """ML-100K rates many films in one second: in log order each is history for the next; excluded, none is
    (and `min_history` counts only strictly earlier interactions)."""
    rows = [("u", f"i{k}", 5.0, 100, 1) for k in range(3)] + [("u", "i3", 1.0, 200, 1)]
    in_order = build_samples(staged_frame(rows), 1, 3.0, history_len=5, min_history=1)
    assert in_order.df["hist_items"].to_list() == [["i0"], ["i0", "i1"], ["i0", "i1", "i2"]]
    apart = build_samples(staged_frame(rows), 1, 3.0, history_len=5, min_history=1, same_time="exclude")
    assert apart.df["item_id"].to_list() == ["i3"] and apart.df["hist_items"].to_list() == [
        ["i0", "i1", "i2"]
    ]


def test_the_history_ties_setting_reaches_the_samples_and_leaves_older_keys_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolora.data import prepare
    from evolora.experiment import context_of
    from tests.helpers import tiny_config, write_sunny_rainy

    data = write_sunny_rainy(tmp_path / "data")
    plain = tiny_config(data, tmp_path / "a")
    apart = tiny_config(data, tmp_path / "b", **{"task.history_ties": "exclude"})
    assert "history_ties" not in context_of(plain)["task"]  # experiments recorded before keep their key
    assert context_of(apart)["task"]["history_ties"] == "exclude"
    asked = []
    real = prepare.build_samples
    monkeypatch.setattr(prepare, "build_samples", lambda *a: asked.append(a[-1]) or real(*a))
    prepare.prepare_data(plain), prepare.prepare_data(apart)
    assert asked == ["log_order", "exclude"]
