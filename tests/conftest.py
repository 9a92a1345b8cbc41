"""Every test runs offline with its own cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_peso_cycle, write_sunny_rainy


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path / "evolora-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def sunny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sunny_rainy(tmp_path_factory.mktemp("sunny"))


@pytest.fixture(scope="session")
def cycle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peso_cycle(tmp_path_factory.mktemp("cycle"))
