"""PESO's pre-blocked format: interactions, synthetic times, preset stages, semantic IDs, and the checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from evolora.config import DataConfig, StagingConfig
from evolora.data import (
    assign_stages,
    load_dataset,
    load_peso_blocks,
    num_stages_of,
    stage_table,
)
from evolora.data.loaders import detect_format
from evolora.errors import ConfigError, DataError

KEY = "Tiny_cl_0.6_0_5_3_0"
REAL = Path(__file__).resolve().parents[2] / "../shared/data/amazon-cds-peso"

# Three blocks; user "u1" comes back in blocks 1 and 2, "u3" first appears in block 1.
BLOCKS = [
    {"u1": (["10", "11", "12"]), "u2": (["11", "13"])},
    {"u1": (["14", "10"]), "u3": (["15"])},
    {"u3": (["16"]), "u1": (["11"])},
]
INDEX = {
    "10": ["<a_1>", "<b_2>", "<c_3>", "<d_0>"],
    "11": ["<a_1>", "<b_2>", "<c_4>", "<d_0>"],
    "12": ["<a_5>", "<b_6>", "<c_7>", "<d_0>"],
    "13": ["<a_5>", "<b_6>", "<c_7>", "<d_1>"],
    "14": ["<a_8>", "<b_9>", "<c_1>", "<d_0>"],
    "15": ["<a_2>", "<b_2>", "<c_2>", "<d_2>"],
    "16": ["<a_3>", "<b_3>", "<c_3>", "<d_3>"],
    "99": ["<a_9>", "<b_9>", "<c_9>", "<d_9>"],  # never interacted: still a decoding target
}


def write_peso(folder: Path, key: str = KEY, index: bool = True, blocks: list | None = None) -> Path:
    """Blocks in PESO's layout, with `previous_block` built as the release does."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[str, list[str]] = {}
    for b, block in enumerate(blocks or BLOCKS):
        out = {}
        for user, current in block.items():
            out[user] = {"previous_block": list(seen.get(user, [])), "current_block": current}
            seen.setdefault(user, []).extend(current)
        (folder / f"{key}.all.block_{b}.json").write_text(json.dumps(out, indent=4))
    if index:
        (folder / f"{key}.index.epoch20000_edim32_beta0.0.json").write_text(json.dumps(INDEX))
    return folder


def test_tiny_blocks(tmp_path: Path) -> None:
    data = load_peso_blocks(write_peso(tmp_path / "peso"))
    assert data.name == KEY
    assert data.like_threshold == 0.0
    inter = data.interactions
    assert inter["user_id"].to_list() == ["u1", "u1", "u1", "u2", "u2", "u1", "u1", "u3", "u3", "u1"]
    assert inter["item_id"].to_list() == ["10", "11", "12", "11", "13", "14", "10", "15", "16", "11"]
    assert inter["timestamp"].to_list() == [
        0,
        1,
        2,
        3,
        4,
        10**9,
        10**9 + 1,
        10**9 + 2,
        2 * 10**9,
        2 * 10**9 + 1,
    ]
    assert set(inter["rating"].to_list()) == {5.0}
    assert (inter["rating"] > data.like_threshold).all()
    assert data.implicit  # a task reading labels (CTR) gets sampled negatives, not 100% likes
    assert data.preset_stages is not None and data.preset_stages.dtype == np.int32
    assert data.preset_stages.tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert data.n_preset_stages == 3

    items = data.items
    assert items.columns == ["item_id", "title", "sid"]
    assert items["item_id"].to_list() == list(INDEX)  # index order, index-only item "99" kept
    sid = dict(zip(items["item_id"], items["sid"], strict=True))
    assert sid["10"] == "<a_1><b_2><c_3><d_0>" and sid["99"] == "<a_9><b_9><c_9><d_9>"
    assert dict(zip(items["item_id"], items["title"], strict=True))["13"] == "item 13"


def test_an_item_a_user_has_again_is_kept_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As the other formats say it (README's Data); PESO's loader said nothing. u1 has 10 and 11 twice."""
    with caplog.at_level(logging.WARNING, logger="evolora.data"):
        data = load_peso_blocks(write_peso(tmp_path / "peso"))
    assert data.interactions.height == 10
    assert (
        f"{KEY}.all.block_0.json: 2 (user, item) pairs occur more than once (4 interactions, first: user "
        "'u1', item '10'); all are kept"
    ) in caplog.text


def test_without_index_and_unindexed_items(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = load_peso_blocks(write_peso(tmp_path / "a", index=False))
    assert data.items.columns == ["item_id", "title"]
    assert data.items["item_id"].to_list() == ["10", "11", "12", "13", "14", "15", "16"]

    folder = write_peso(tmp_path / "b", blocks=[*BLOCKS, {"u2": ["77"]}])
    data = load_peso_blocks(folder)
    assert "1 interacted items have no semantic ID" in caplog.text
    row = data.items.filter(pl.col("item_id") == "77").row(0, named=True)
    assert row == {"item_id": "77", "title": "item 77", "sid": None}


def test_previous_block_must_match(tmp_path: Path) -> None:
    folder = write_peso(tmp_path / "peso")
    path = folder / f"{KEY}.all.block_2.json"
    block = json.loads(path.read_text())
    block["u1"]["previous_block"] = ["10", "11", "12", "14", "99"]  # last earlier item is "10", not "99"
    path.write_text(json.dumps(block))
    with pytest.raises(DataError, match=r"block_2\.json: user 'u1': previous_block .* differ at position 4"):
        load_peso_blocks(folder)


def test_detection_and_dispatch(tmp_path: Path) -> None:
    folder = write_peso(tmp_path / "peso")
    block1 = folder / f"{KEY}.all.block_1.json"
    assert detect_format(folder) == "peso"
    assert detect_format(block1) == "peso"
    via_auto = load_dataset(DataConfig(source=str(folder)))
    via_file = load_dataset(DataConfig(source=str(block1), format="peso"))
    for data in (via_auto, via_file):
        assert data.name == KEY and data.interactions.height == 10
        assert data.preset_stages is not None and data.preset_stages.tolist()[-1] == 3


def test_keys_and_missing_blocks(tmp_path: Path) -> None:
    folder = write_peso(tmp_path / "peso")
    write_peso(folder, key="Other_cl", index=False)
    with pytest.raises(DataError, match=r"several PESO datasets; keys found: \['Other_cl', 'Tiny_cl"):
        load_peso_blocks(folder)
    assert load_peso_blocks(folder, key="Other_cl").name == "Other_cl"
    assert load_peso_blocks(folder / "Other_cl.all.block_0.json").items.columns == ["item_id", "title"]
    with pytest.raises(DataError, match="no block files for key 'Nope'"):
        load_peso_blocks(folder, key="Nope")
    (folder / "Other_cl.all.block_1.json").unlink()
    with pytest.raises(DataError, match=r"Other_cl\.all\.block_1\.json is missing"):
        load_peso_blocks(folder, key="Other_cl")
    with pytest.raises(DataError, match="no PESO block files"):
        load_peso_blocks(tmp_path)


def test_a_folder_without_block_0_is_named_under_auto(tmp_path: Path) -> None:
    """It was passed to the Amazon loader, which asked for a metadata file."""
    folder = write_peso(tmp_path / "peso")
    (folder / f"{KEY}.all.block_0.json").unlink()
    with pytest.raises(DataError, match=r"block_0\.json is missing"):
        load_dataset(DataConfig(source=str(folder)))


def test_bad_records(tmp_path: Path) -> None:
    folder = write_peso(tmp_path / "peso")
    (folder / f"{KEY}.all.block_1.json").write_text(json.dumps({"u1": {"current_block": "14"}}))
    with pytest.raises(DataError, match="user 'u1': previous_block should be a list"):
        load_peso_blocks(folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # json.load would keep the second "u1" and lose the first one's block without a word
        ('{"u1": {"previous_block": [], "current_block": ["10"]}, "u1": {"previous_block": [], '
         '"current_block": ["11"]}}', "'u1' appears twice in one JSON object"),
        ('{"": {"previous_block": [], "current_block": ["10"]}}', "an empty user id"),
        ('{"u1": {"previous_block": [], "current_block": [true, "10"]}}', "current_block should be a list"),
        ('{"u1": {"previous_block": [], "current_block": [" "]}}', "current_block should be a list"),
    ],
)  # fmt: skip
def test_block_records_that_would_lose_or_invent_rows(tmp_path: Path, text: str, message: str) -> None:
    folder = write_peso(tmp_path / "peso")
    (folder / f"{KEY}.all.block_0.json").write_text(text)
    with pytest.raises(DataError, match=message):
        load_peso_blocks(folder)


def test_preset_staging(tmp_path: Path) -> None:
    data = load_peso_blocks(write_peso(tmp_path / "peso"))
    staged = assign_stages(data.interactions, StagingConfig(scheme="preset"), data.preset_stages)
    assert staged["stage"].to_list() == data.preset_stages.tolist()
    assert num_stages_of(staged) == 3
    table = stage_table(staged)
    assert table["interactions"].to_list() == [5, 3, 2]
    assert table["new_users"].to_list() == [2, 1, 0]

    assert assign_stages(
        data.interactions, StagingConfig(scheme="preset", n_stages=3), data.preset_stages
    ).height
    with pytest.raises(DataError, match="n_stages=4 but the dataset comes with 3 stages"):
        assign_stages(data.interactions, StagingConfig(scheme="preset", n_stages=4), data.preset_stages)
    with pytest.raises(DataError, match=r"scheme=preset .* this data has none: map data\.columns\.stage"):
        assign_stages(data.interactions, StagingConfig(scheme="preset"))
    with pytest.raises(ConfigError, match="takes its number of stages from the data"):
        _ = StagingConfig(scheme="preset").num_stages

    # Other schemes stage PESO data by its (synthetic) timestamps.
    by_time = assign_stages(
        data.interactions, StagingConfig(scheme="global", ratios=(0.5, 0.5)), data.preset_stages
    )
    assert by_time["stage"].to_list() == [1] * 5 + [2] * 5


def test_preset_stays_aligned(tmp_path: Path) -> None:
    data = load_peso_blocks(write_peso(tmp_path / "peso"))
    with pytest.raises(DataError, match="pass the stages of the new interactions"):
        data.with_interactions(data.interactions.tail(3))
    # k-core through load_dataset: u3 (2 interactions) and u2 (2) go; the stages follow their rows.
    cored = load_dataset(DataConfig(source=str(tmp_path / "peso"), kcore={"user": 3}))
    assert cored.interactions["user_id"].to_list() == ["u1"] * 6
    assert cored.preset_stages is not None and cored.preset_stages.tolist() == [1, 1, 1, 2, 2, 3]
    recent = load_dataset(DataConfig(source=str(tmp_path / "peso"), max_interactions=6))
    with pytest.raises(DataError, match=r"preset stages \[1\] have no interactions"):
        load_dataset(DataConfig(source=str(tmp_path / "peso"), max_interactions=4))
    assert recent.preset_stages is not None and recent.preset_stages.tolist() == [1, 2, 2, 2, 3, 3]
    with pytest.raises(DataError, match="2 preset stages for 10 interactions"):
        data.with_interactions(data.interactions, preset_stages=np.array([1, 2])).validate()
    with pytest.raises(DataError, match="preset stages go back in time"):
        data.with_interactions(
            data.interactions, preset_stages=np.array([1] * 5 + [2, 1, 2, 3, 3])
        ).validate()


@pytest.mark.skipif(not REAL.is_dir(), reason="PESO's CDs release is not available here")
def test_real_cds_release() -> None:
    data = load_peso_blocks(REAL)
    assert data.name == "CDs_and_Vinyl_cl_0.6_0_5_3_0"
    inter = data.interactions.with_columns(stage=pl.Series(data.preset_stages))
    per_stage = inter.group_by("stage").agg(users=pl.col("user_id").n_unique(), n=pl.len()).sort("stage")
    assert per_stage["users"].to_list() == [8494, 1013, 866, 1078, 1074]
    assert per_stage["n"].to_list() == [81355, 8686, 7488, 9468, 9421]
    used = data.items.join(inter.select("item_id").unique(), on="item_id")
    assert used.height == data.n_items
    assert used["sid"].null_count() == 0
    assert (used["sid"].str.count_matches(r"<[a-d]_\d+>") == 4).all()
