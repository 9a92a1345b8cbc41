"""Every test runs offline with its own cache folder, and on the CPU.

The suite's numbers, devices and timings are those of CI's CPUs, so a GPU is hidden from it (and from the
commands it starts) unless `EVOLORA_TEST_CUDA=1`: the CUDA tests (`test_cuda_*`) need that, and
`make gpu-check` sets it to run them.
"""

from __future__ import annotations

import os

if os.environ.get("EVOLORA_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA

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
