"""`InteractionData.files` from every loader, and `data_digest` over them."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from datafiles import count_hashes, write_atomic, write_jsonl, write_ml1m, write_ml100k
from test_peso_blocks import KEY, write_peso

from evolora.config import DataConfig
from evolora.data import (
    data_digest,
    load_amazon_2023,
    load_dataset,
    load_movielens_1m,
    load_movielens_100k,
    load_movielens_atomic,
    load_peso_blocks,
)
from evolora.errors import DataError


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_loader_records_its_files_in_read_order(tmp_path: Path) -> None:
    def absolute(*paths: Path) -> tuple[str, ...]:
        return tuple(str(p.resolve()) for p in paths)

    a = write_ml100k(tmp_path / "a")
    assert load_movielens_100k(a).files == absolute(a / "u.data", a / "u.item")
    b = write_atomic(tmp_path / "b")
    assert load_movielens_atomic(b).files == absolute(b / "ml-100k.inter", b / "ml-100k.item")
    c = write_ml1m(tmp_path / "c")
    assert load_movielens_1m(c).files == absolute(c / "ratings.dat", c / "movies.dat")
    r = write_jsonl(
        tmp_path / "d" / "r.jsonl", [{"user_id": "U", "parent_asin": "A", "rating": 1, "timestamp": 1}]
    )
    m = write_jsonl(tmp_path / "d" / "meta.jsonl", [{"parent_asin": "A", "title": "a"}])
    assert load_amazon_2023(r, m).files == absolute(r, m)
    p = write_peso(tmp_path / "p")
    blocks = [p / f"{KEY}.all.block_{b}.json" for b in range(3)]
    assert load_peso_blocks(p).files == absolute(*blocks, p / f"{KEY}.index.epoch20000_edim32_beta0.0.json")
    # Filters keep the record; it is not part of equality.
    data = load_dataset(DataConfig(source=str(a), kcore={"user": 2}))
    assert data.files == absolute(a / "u.data", a / "u.item")
    assert replace(data, files=()) == data
    # Tables compare by content (a second load holds new frames), on every Python version.
    assert load_dataset(DataConfig(source=str(a), kcore={"user": 2})) == data
    assert replace(data, interactions=data.interactions.head(3)) != data


def test_digest_names_hashes_and_changes_with_content(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "a")
    digest = data_digest(load_movielens_100k(folder))
    assert digest["files"] == {"u.data": sha(folder / "u.data"), "u.item": sha(folder / "u.item")}
    overall = hashlib.sha256(f"u.data\t{sha(folder / 'u.data')}\nu.item\t{sha(folder / 'u.item')}\n".encode())
    assert digest["sha256"] == overall.hexdigest()
    # The same files elsewhere: the same digest.
    shutil.copytree(folder, tmp_path / "b")
    assert data_digest(load_movielens_100k(tmp_path / "b")) == digest

    data = load_movielens_100k(folder)
    with (folder / "u.data").open("a") as f:
        f.write("3\t1\t4\t500\n")
    changed = data_digest(data)
    assert changed["sha256"] != digest["sha256"]
    assert changed["files"]["u.item"] == digest["files"]["u.item"]
    # Same size, new content: the mtime tells the cache the file changed.
    stat = (folder / "u.data").stat()
    (folder / "u.data").write_bytes((folder / "u.data").read_bytes().replace(b"500", b"501"))
    os.utime(folder / "u.data", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert data_digest(data)["sha256"] not in (digest["sha256"], changed["sha256"])


def test_digest_is_cached_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_movielens_100k(write_ml100k(tmp_path))
    hashed = count_hashes(monkeypatch)
    first = data_digest(data)
    assert data_digest(data) == first
    assert hashed == ["u.data", "u.item"]  # once each


def test_digest_without_files_and_of_a_deleted_file(tmp_path: Path) -> None:
    data = load_movielens_100k(write_ml100k(tmp_path))
    assert data_digest(replace(data, files=())) == {"sha256": None, "files": {}}
    (tmp_path / "u.item").unlink()
    with pytest.raises(DataError, match=r"u\.item: cannot read the data file"):
        data_digest(data)
