"""Data tests: every test gets its own cache, and real network and pip calls are refused."""

from __future__ import annotations

import importlib
import urllib.error
from pathlib import Path

import pytest

from evolora.errors import DataError

# `evolora.data.fetch` the attribute is the function; the module has to be looked up by name.
fetch_mod = importlib.import_module("evolora.data.fetch")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache; real network and pip calls are refused (file:// URLs still work)."""
    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EVOLORA_DATA_MIRROR", raising=False)
    real_download = fetch_mod._download

    def download(url: str, dest: Path) -> str:
        if not url.startswith("file:"):
            raise urllib.error.URLError("network disabled in tests")
        return real_download(url, dest)

    def pip_download(requirement: str, dest: Path) -> Path:
        raise DataError("pip disabled in tests")

    monkeypatch.setattr(fetch_mod, "_download", download)
    monkeypatch.setattr(fetch_mod, "pip_download", pip_download)
