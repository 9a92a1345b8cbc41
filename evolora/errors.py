"""User-facing errors, and warnings said once per run.

Anything a user can cause (a bad file, a bad config value, a missing dataset) raises `EvoloraError` with a
message that says what is wrong and where. The CLI prints these without a traceback; programming errors keep
their traceback. `warn_once` says a warning once per experiment (every run's log.txt holds it, however many
run in one process).
"""

from __future__ import annotations

import logging
from typing import Any

_said: set[str] = set()


def warn_once(logger: logging.Logger, key: str, message: str, *args: Any) -> None:
    """`logger.warning(message, *args)` the first time `key` comes up since `forget_warnings()`."""
    if key not in _said:
        _said.add(key)
        logger.warning(message, *args)


def forget_warnings() -> None:
    """A new experiment starts: each once-per-run warning is said again in it."""
    _said.clear()


class EvoloraError(Exception):
    """An error caused by user input: printed as a one-paragraph message, never as a traceback."""


class DataError(EvoloraError):
    """A data file is missing, malformed or inconsistent. The message names the file and row."""


class EmptyStagesError(DataError):
    """Stages that give no samples (no interaction has enough history before it); `stages` names them."""

    def __init__(self, stages: list[int], message: str) -> None:
        super().__init__(message)
        self.stages = stages


class UnknownIdError(EvoloraError):
    """A query names a user or an item the model does not know (the server answers 404)."""


class ModelNotFoundError(EvoloraError):
    """The base model named cannot be found: not a folder, not in a cache, and the hub cannot give it."""


class ConfigError(EvoloraError):
    """A configuration value is invalid. The message names the key."""


class DamagedFileError(EvoloraError):
    """A file evolora wrote earlier cannot be read back (truncated, damaged, or an unsafe older format).

    `path` names the file; the message says what to do about it.
    """

    def __init__(self, path: object, message: str) -> None:
        super().__init__(message)
        self.path = path
