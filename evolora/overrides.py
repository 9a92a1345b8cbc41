"""Python values as `--set` overrides, for `evolora.run(config, **overrides)`: paths, numpy numbers and
tuples become what YAML writes; a section given as a mapping sets the keys it names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evolora.errors import ConfigError


def plain(value: Any) -> Any:
    """A value as YAML and the config read it: paths as strings, numpy numbers as Python ones, tuples and
    other sequences as lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic | np.ndarray):
        return plain(value.tolist())
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def _yaml(value: Any) -> str:
    """A value as `--set` reads it (YAML)."""
    import yaml

    try:
        text = yaml.safe_dump(plain(value), default_flow_style=True)
    except yaml.YAMLError:
        raise ConfigError(f"{value!r}: a setting is a number, a string, a list or a mapping") from None
    return text.strip().removesuffix("...").strip()


def as_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """Keyword overrides as `--set` takes them (`key=YAML`)."""
    return [f"{key}={_yaml(value)}" for key, value in _flat(overrides)]


def _flat(overrides: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Keyword overrides as `--set` keys. A section given as a mapping (`train={"epochs": 3}`,
    `model={"lora": {"r": 4}}`) sets each key it names, at any depth, keeping the others; a value under a
    dotted key replaces that setting whole, as `--set` does (`**{"data.columns": {...}}`: a new table's
    columns)."""
    out = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and (prefix or "." not in key):
            out += _flat(value, f"{name}.")
        else:
            out.append((name, value))
    return out
