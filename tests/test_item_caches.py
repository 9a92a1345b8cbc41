"""The item caches of an output folder (`runs/_shared`): next-item semantic IDs and the item embeddings of
CTR history retrieval, keyed by what they are made of (item texts, stage-1 items, weights), and each run
reading the files it was built from (its bundle, its continued experiment, its updates)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import evolora
from evolora.errors import DataError
from evolora.experiment import restore_run, run_experiment
from tests.helpers import keep_caches_as_before_2026_12_05, save_tiny_model, tiny_config, write_sunny_rainy

NEXT_ITEM = {
    "task.name": "next_item",
    "task.history_len": 6,
    "task.template": "peso",
    "protocol": "leave_last_out",
    "strategies": "[frozen]",
    "eval.max_samples": 8,
}
RETRIEVAL = {
    "task.history_len": 4,
    "task.retrieve_from": 8,
    "task.sample_history": 10,
    "strategies": "[frozen]",
}


def _retitle(data: Path) -> None:
    """Edit the item file in place: every "Sunny" title becomes "Cloudy" (same path, same settings)."""
    items = data / "u.item"
    items.write_text(items.read_text(encoding="latin-1").replace("Sunny", "Cloudy"), encoding="latin-1")


def _item_tokens(root: Path) -> dict[str, list[str]]:
    return evolora.Recommender.load(root)._task.item_tokens


def _item_vectors(root: Path) -> dict[str, list[float]]:
    vectors = evolora.Recommender.load(root)._task.item_vectors
    return {item: np.asarray(v).round(6).tolist() for item, v in vectors.items()}


def test_semantic_ids_of_items_edited_in_place_are_built_again(tmp_path: Path) -> None:
    """A second next-item experiment in the folder, on the item file edited in place, gets the IDs a fresh
    folder gives it, not the first experiment's, which keeps its own."""
    data = write_sunny_rainy(tmp_path / "data")
    out = tmp_path / "runs"
    run_experiment(tiny_config(data, out, name="a", **NEXT_ITEM))
    first = _item_tokens(out / "a")
    _retitle(data)
    run_experiment(tiny_config(data, out, name="b", **NEXT_ITEM))
    run_experiment(tiny_config(data, tmp_path / "fresh", name="b", **NEXT_ITEM))
    edited, fresh = _item_tokens(out / "b"), _item_tokens(tmp_path / "fresh" / "b")
    assert edited == fresh and edited != first
    assert _item_tokens(out / "a") == first
    assert len(list((out / "_shared" / "semantic_ids").glob("*[0-9a-f].json"))) == 2
    # The bundle's copy deleted: a clear error (the data was edited since: it cannot be bundled again).
    (bundled,) = (out / "a" / "inference" / "_shared" / "semantic_ids").glob("*[0-9a-f].json")
    bundled.unlink()
    with pytest.raises(DataError, match="semantic IDs this trained run was built with are missing"):
        _item_tokens(out / "a")


def test_semantic_ids_on_other_weights_under_one_model_name_are_built_again(tmp_path: Path) -> None:
    """`model.name` a folder saved again with other weights: the backbone that embeds the item texts
    changed, so the IDs are the other weights' own."""
    data = write_sunny_rainy(tmp_path / "data")
    folder = tmp_path / "model"

    def run(out: Path, name: str) -> dict[str, list[str]]:
        run_experiment(tiny_config(data, out, name=name, **NEXT_ITEM, **{"model.name": str(folder)}))
        return _item_tokens(out / name)

    save_tiny_model(folder, 0)
    first = run(tmp_path / "runs", "a")
    save_tiny_model(folder, 7)
    other = run(tmp_path / "runs", "b")
    assert other == run(tmp_path / "fresh", "b") and other != first


def test_item_embeddings_of_items_edited_in_place_are_computed_again(tmp_path: Path) -> None:
    """The CTR history retrieval's item embeddings, likewise."""
    data = write_sunny_rainy(tmp_path / "data")
    out = tmp_path / "runs"
    run_experiment(tiny_config(data, out, name="a", **RETRIEVAL))
    first = _item_vectors(out / "a")
    (own,) = (out / "_shared" / "item_vectors").glob("*.npz")
    _retitle(data)
    run_experiment(tiny_config(data, out, name="b", **RETRIEVAL))
    run_experiment(tiny_config(data, tmp_path / "fresh", name="b", **RETRIEVAL))
    edited = _item_vectors(out / "b")
    assert edited == _item_vectors(tmp_path / "fresh" / "b") and edited != first
    assert _item_vectors(out / "a") == first
    assert own.is_file() and len(list((out / "_shared" / "item_vectors").glob("*.npz"))) == 2


def _swap_two_items(ids_files: list[Path]) -> tuple[str, str]:
    """Swap the IDs of the first two items in these copies of one IDs file: what reads them shows it."""
    for path in ids_files:
        index = json.loads(path.read_text())
        a, b = list(index)[:2]
        index[a], index[b] = index[b], index[a]
        path.write_text(json.dumps(index))
    return a, b


def test_a_run_of_an_older_evolora_keeps_the_semantic_ids_it_was_built_with(tmp_path: Path) -> None:
    """Its IDs are named by the settings' key (before 2026-12-05), in the cache and in its bundle: loading
    it, continuing its experiment and rebuilding its bundle read those, never IDs built again; another
    experiment in the folder builds its own, as does the experiment started afresh (its bundle too)."""
    data = write_sunny_rainy(tmp_path / "data")
    out = tmp_path / "runs"
    cfg = tiny_config(data, out, name="old", **NEXT_ITEM)
    run_experiment(cfg)
    root = out / "old"
    built = _item_tokens(root)
    legacy = keep_caches_as_before_2026_12_05(cfg)
    bundled = root / "inference" / "_shared" / legacy.relative_to(cfg.shared_root)
    a, b = _swap_two_items([legacy, bundled])
    swapped = {**built, a: built[b], b: built[a]}
    assert _item_tokens(root) == swapped  # the bundle's copy
    files = set((out / "_shared" / "semantic_ids").iterdir())
    run_experiment(cfg)  # continued (nothing left to run): set up on its own IDs
    assert set((out / "_shared" / "semantic_ids").iterdir()) == files
    recorded = json.loads((root / "experiment.json").read_text())["caches"]
    assert recorded == {"semantic_ids": legacy.relative_to(cfg.shared_root).as_posix()}
    strategy, _, _ = restore_run(root / "frozen" / "seed0")  # (what export-user-adapter reads)
    strategy.teardown()
    assert strategy.task.item_tokens == swapped
    assert set((out / "_shared" / "semantic_ids").iterdir()) == files
    shutil.rmtree(root / "inference")  # rebuilt from the data, with the IDs the experiment names
    assert _item_tokens(root) == swapped
    run_experiment(tiny_config(data, out, name="new", **NEXT_ITEM))
    assert _item_tokens(out / "new") == built
    shutil.rmtree(root / "frozen")  # as if killed before its first stage: set up afresh, bundle included
    run_experiment(cfg)
    assert _item_tokens(root) == built
