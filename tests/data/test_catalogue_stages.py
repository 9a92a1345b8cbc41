"""scripts/catalogue_stages.py: periods by time, each keeping one genre group's items, written as a table
whose stage column evolora reads back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
import pytest

from evolora.config import DataConfig, StagingConfig
from evolora.data import assign_stages, load_dataset
from evolora.data.schema import InteractionData
from evolora.errors import DataError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "catalogue_stages.py"
_spec = importlib.util.spec_from_file_location("catalogue_stages", SCRIPT)
assert _spec is not None and _spec.loader is not None
catalogue = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(catalogue)

GENRES = {"a": "Drama", "b": "Drama, Romance", "c": "Comedy", "d": "Comedy, Drama", "e": None, "f": "Action"}
DRAMA, COMEDY = frozenset({"Drama", "Romance"}), frozenset({"Comedy"})


def toy() -> InteractionData:
    """40 interactions at times 0..39: user u<k%4>, item "abcdef"[k%6], rating 1 + k%5."""
    inter = pl.DataFrame(
        {
            "user_id": [f"u{k % 4}" for k in range(40)],
            "item_id": ["abcdef"[k % 6] for k in range(40)],
            "rating": [float(1 + k % 5) for k in range(40)],
            "timestamp": list(range(40)),
        }
    )
    items = pl.DataFrame(
        {"item_id": list(GENRES), "title": [f"Film {i}" for i in GENRES], "genre": list(GENRES.values())}
    )
    return InteractionData("toy", inter, items).validate()


def test_each_period_keeps_its_groups_items() -> None:
    data = toy()
    staged = catalogue.catalogue_stages(data, [DRAMA, COMEDY, DRAMA, COMEDY])
    periods = assign_stages(data.interactions, StagingConfig(scheme="lsat", n_stages=4))
    group = {"a": DRAMA, "b": DRAMA, "c": COMEDY}  # d is both, e has no genre, f is in no group
    expected = periods.filter(
        pl.struct("item_id", "stage").map_elements(
            lambda r: group.get(r["item_id"]) == (DRAMA, COMEDY)[(r["stage"] - 1) % 2],
            return_dtype=pl.Boolean,
        )
    )
    assert staged.select(expected.columns).equals(expected)
    assert set(staged["stage"]) == {1, 2, 3, 4} and set(staged["item_id"]) == {"a", "b", "c"}


def test_the_written_table_reads_back_with_its_stages(tmp_path: Path) -> None:
    data = toy()
    staged = catalogue.catalogue_stages(data, [DRAMA, COMEDY, DRAMA])
    catalogue.write(data, staged, tmp_path / "toy-genres.csv")
    columns = {"user": "user", "item": "item", "time": "time", "rating": "rating", "stage": "stage"}
    cfg = DataConfig(
        source=str(tmp_path / "toy-genres.csv"),
        format="table",
        meta=str(tmp_path / "toy-genres-items.csv"),
        columns={**columns, "title": "title", "genre": "genre"},
    )
    read = load_dataset(cfg)
    assert read.preset_stages is not None
    assert read.preset_stages.tolist() == staged["stage"].to_list()
    assert read.interactions.select("user_id", "item_id", "timestamp").equals(
        staged.select("user_id", "item_id", "timestamp")
    )
    assert sorted(read.items["item_id"]) == ["a", "b", "c"]  # only the items the log keeps
    assert read.name == "toy-genres"
    with pytest.raises(DataError, match=r"names the log's \.csv file"):
        catalogue.write(data, staged, tmp_path / "folder")


def test_errors() -> None:
    with pytest.raises(DataError, match=r"no item has the genres \['Western'\]"):
        catalogue.catalogue_stages(toy(), [DRAMA, frozenset({"Western"})])
    with pytest.raises(DataError, match="at least two stages"):
        catalogue.catalogue_stages(toy(), [DRAMA])
    # Action's only film (f) is rated at times 5, 11, 17, 23, 29, 35: not in periods 1 (0..4), 7 (30..34).
    with pytest.raises(DataError, match=r"stages \[1, 7\] have no interactions with their group's items"):
        catalogue.catalogue_stages(toy(), [frozenset({"Action"}), DRAMA] * 4)
