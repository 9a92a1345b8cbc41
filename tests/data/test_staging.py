"""Staging schemes: counts, tie-respecting boundaries, scheme-specific sizes, empty-stage errors."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest

from evolora.config import StagingConfig
from evolora.data import assign_stages, kcore, stage_table
from evolora.data.filters import keep_recent
from evolora.data.staging import stage_global, stage_lsat, stage_peso
from evolora.errors import DataError


def interactions(timestamps: list[int] | np.ndarray, n_users: int = 7, n_items: int = 11) -> pl.DataFrame:
    ts = np.sort(np.asarray(timestamps, dtype=np.int64))
    n = len(ts)
    return pl.DataFrame(
        {
            "user_id": [str(i % n_users) for i in range(n)],
            "item_id": [str((i * 3) % n_items) for i in range(n)],
            "rating": np.full(n, 4.0),
            "timestamp": ts,
        }
    )


@pytest.fixture
def tied() -> pl.DataFrame:
    """1000 interactions over 400 distinct timestamps: plenty of ties to respect."""
    return interactions(np.random.default_rng(0).integers(0, 400, size=1000))


def max_tie(df: pl.DataFrame) -> int:
    return int(df["timestamp"].value_counts()["count"].max())  # type: ignore[arg-type]


def check_boundaries(staged: pl.DataFrame, n_stages: int) -> list[int]:
    """Counts add up, every stage is there, and timestamps strictly increase from one stage to the next."""
    assert staged["stage"].dtype == pl.Int32
    counts = [int((staged["stage"] == t).sum()) for t in range(n_stages + 1)]
    assert sum(counts) == staged.height
    assert all(c > 0 for c in counts[1:])
    ranges = (
        staged.group_by("stage").agg(lo=pl.col("timestamp").min(), hi=pl.col("timestamp").max()).sort("stage")
    )
    his, los = ranges["hi"].to_list(), ranges["lo"].to_list()
    assert all(his[k] < los[k + 1] for k in range(len(his) - 1)), ranges
    return counts


def test_lsat_count(tied: pl.DataFrame) -> None:
    staged = stage_lsat(tied, 4)
    counts = check_boundaries(staged, 4)
    assert counts[0] == 0
    # Equal counts up to the tie rule: a cut moves forward by less than one tie group.
    assert max(counts[1:]) - min(counts[1:]) <= 2 * max_tie(tied)
    assert staged.drop("stage").equals(tied)


def test_lsat_last_n_leaves_history(tied: pl.DataFrame) -> None:
    staged = stage_lsat(tied, 4, last_n=400)
    counts = check_boundaries(staged, 4)
    assert 400 - max_tie(tied) < sum(counts[1:]) <= 400
    # History is exactly the interactions before the window.
    first_staged = staged.filter(pl.col("stage") > 0)["timestamp"].min()
    assert staged.filter(pl.col("stage") == 0)["timestamp"].max() < first_staged  # type: ignore[operator]


def test_lsat_time_bins_equal_spans(tied: pl.DataFrame) -> None:
    staged = stage_lsat(tied, 5, by="time")
    check_boundaries(staged, 5)
    t0, t1 = int(tied["timestamp"].min()), int(tied["timestamp"].max())  # type: ignore[arg-type]
    span = t1 - t0 + 1
    edges = [t0 + -(-k * span // 5) for k in range(6)]  # ceil(k * span / 5)
    widths = np.diff(edges)
    assert widths.max() - widths.min() <= 1
    for t in range(1, 6):
        ts = staged.filter(pl.col("stage") == t)["timestamp"]
        assert edges[t - 1] <= ts.min() and ts.max() < edges[t]  # type: ignore[operator]


def test_peso_base_fraction(tied: pl.DataFrame) -> None:
    staged = stage_peso(tied, 5, 0.6)
    counts = check_boundaries(staged, 5)
    assert 600 <= counts[1] < 600 + max_tie(tied)
    assert max(counts[2:]) - min(counts[2:]) <= 2 * max_tie(tied)


def test_global_8_1_1() -> None:
    staged = stage_global(interactions(range(1000)))
    assert check_boundaries(staged, 3) == [0, 800, 100, 100]


def test_assign_stages_dispatch(tied: pl.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="evolora.data"):
        assert assign_stages(tied, StagingConfig())["stage"].max() == 4
    assert "D1=" in caplog.text
    assert assign_stages(tied, StagingConfig(scheme="peso"))["stage"].max() == 5
    assert assign_stages(tied, StagingConfig(scheme="global", ratios=(0.5, 0.5)))["stage"].max() == 2
    staged = assign_stages(tied, StagingConfig(n_stages=3, last_n=100, by="time"))
    assert staged["stage"].max() == 3 and (staged["stage"] == 0).sum() >= 900


def test_settings_a_scheme_does_not_read_are_said(
    tied: pl.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        assign_stages(tied, StagingConfig(scheme="peso", by="time", ratios=(0.5, 0.5)))
        assert "staging.by, staging.ratios: not read by the peso scheme; ignored" in caplog.text
        caplog.clear()
        assign_stages(
            tied, StagingConfig(scheme="lsat", by="count", n_stages=3)
        )  # defaults and its own: quiet
        assert not caplog.text


def test_dates_are_refused_on_data_that_only_orders_its_rows(tied: pl.DataFrame) -> None:
    with pytest.raises(DataError, match=r"timestamps only order its rows"):
        assign_stages(tied, StagingConfig(scheme="lsat", by="time"), synthetic_time=True)
    assert assign_stages(tied, StagingConfig(scheme="lsat"), synthetic_time=True)["stage"].max() == 4
    # single reads no `by` (it is said to be ignored), so it is not refused for one either
    single = StagingConfig(scheme="single", by="time")
    assert assign_stages(tied, single, synthetic_time=True)["stage"].max() == 1


def test_an_empty_peso_stage_says_which_way_to_move_the_base() -> None:
    df = interactions(list(range(20)))
    with pytest.raises(DataError, match=r"stage 2 is empty: .*give it a smaller staging\.base_fraction"):
        assign_stages(df, StagingConfig(scheme="peso", base_fraction=0.9))


def test_preset_stages_given_directly_are_checked() -> None:
    """Through the loaders they were; passed to assign_stages, 1.9 became stage 1 and a later stage 1 row
    after a stage 2 row was taken."""
    df = interactions([1, 2, 3, 4])
    preset = StagingConfig(scheme="preset")
    with pytest.raises(DataError, match=r"whole numbers, found 1\.9"):
        assign_stages(df, preset, np.array([1.0, 1.9, 2.0, 2.5]))
    for dtype in (np.int64, np.uint8):  # (unsigned differences wrap around instead of going below 0)
        with pytest.raises(DataError, match="go back in time"):
            assign_stages(df, preset, np.array([2, 2, 1, 1], dtype=dtype))
    assert assign_stages(df, preset, np.array([1.0, 1.0, 2.0, 2.0]))["stage"].to_list() == [1, 1, 2, 2]


def test_ties_are_never_split() -> None:
    # Equal-count cuts would fall at 2 and 4, both inside tie groups; they move to the groups' ends.
    staged = stage_lsat(interactions([1, 1, 1, 2, 2, 3]), 3)
    assert staged["stage"].to_list() == [1, 1, 1, 2, 2, 3]


def test_a_tie_group_at_the_end_is_a_stage_of_its_own() -> None:
    """Cuts move forward past a group of equal timestamps; at the end of the log that swallowed the last
    stage ("stage 2 is empty ... Use fewer stages", with 2 the fewest). The cut now goes back instead."""
    times = [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    assert stage_lsat(interactions(times), 2)["stage"].to_list() == [1] * 4 + [2] * 6
    assert stage_lsat(interactions([1, 1, 1, 2, 2, 3]), 3)["stage"].to_list() == [
        1,
        1,
        1,
        2,
        2,
        3,
    ]  # as before
    with pytest.raises(DataError, match=r"6 interactions share timestamp 5.*needs more distinct times"):
        stage_lsat(interactions([5] * 6), 2)


def test_empty_stage_errors() -> None:
    with pytest.raises(DataError, match=r"stage 2 is empty: 6 interactions share timestamp 5.*fewer stages"):
        stage_lsat(interactions([5] * 6), 3)
    with pytest.raises(DataError, match=r"stage 1 is empty: only 2 interactions to cut into 3 stages"):
        stage_lsat(interactions([1, 2]), 3)
    with pytest.raises(DataError, match=r"stage 2 is empty: no interaction falls in its time span"):
        stage_lsat(interactions([0, 1, 2, 100]), 4, by="time")
    with pytest.raises(
        DataError, match=r"the last 3 interactions all share their timestamp.*raise staging\.last_n"
    ):
        stage_lsat(interactions([1] * 5 + [2] * 5), 2, last_n=3)
    with pytest.raises(DataError, match="stage 2 is empty: 9 interactions share timestamp 1"):
        stage_global(interactions([1] * 9 + [2]))
    with pytest.raises(DataError, match="stage 2 is empty"):
        stage_peso(interactions([1] * 8 + [2, 3]), 4)


def test_stage_table() -> None:
    df = pl.DataFrame(
        {
            "user_id": ["a", "b", "a", "c", "b"],
            "item_id": ["x", "y", "y", "z", "x"],
            "rating": [1.0, 4.0, 5.0, 2.0, 3.5],
            "timestamp": [1, 2, 3, 4, 5],
            "stage": pl.Series([0, 1, 1, 2, 2], dtype=pl.Int32),
        }
    )
    table = stage_table(df)
    assert table.columns == [
        "stage", "interactions", "users", "new_users", "items", "new_items",
        "first_timestamp", "last_timestamp",
    ]  # fmt: skip
    assert table.rows() == [(0, 1, 1, 1, 1, 1, 1, 1), (1, 2, 2, 1, 1, 1, 2, 3), (2, 2, 2, 1, 2, 1, 4, 5)]
    # With a threshold, each stage's share of ratings above it (TALLRec's label): 0/1, 2/2, 1/2.
    liked = stage_table(df, like_threshold=3.0)
    assert liked.columns == [*table.columns, "liked"]
    assert liked["liked"].to_list() == [0.0, 1.0, 0.5]


def test_kcore_cascades(caplog: pytest.LogCaptureFixture) -> None:
    # u4 goes (1 interaction) -> i3 drops to 1 -> u3 drops to 1: only u1, u2 x i1, i2 survive.
    pairs = [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2"), ("u3", "i1"), ("u3", "i3"), ("u4", "i3")]
    df = pl.DataFrame({"user_id": [u for u, _ in pairs], "item_id": [i for _, i in pairs], "x": range(7)})
    with caplog.at_level(logging.INFO, logger="evolora.data"):
        core = kcore(df, 2, 2)
    assert core["x"].to_list() == [0, 1, 2, 3]
    assert "removed 3 of 7 interactions, 2 of 4 users, 1 of 3 items" in caplog.text
    assert kcore(df, 1, 0).equals(df)
    assert kcore(df, 0, 3)["item_id"].to_list() == ["i1", "i1", "i1"]


def test_keep_recent() -> None:
    df = interactions(range(10))
    assert keep_recent(df, 3)["timestamp"].to_list() == [7, 8, 9]
    assert keep_recent(df, 30).equals(df)
