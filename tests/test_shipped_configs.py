"""Every config shipped in configs/ (and so in the package, through evolora/configs) loads and validates:
a typo or a removed key in one of them would otherwise surface only when someone runs it for hours."""

from __future__ import annotations

from pathlib import Path

import pytest

from evolora.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(str(path), [])
    assert cfg.name and cfg.strategies and cfg.seeds
