"""User-facing errors.

Anything a user can cause (a bad file, a bad config value, a missing dataset) raises `EvoloraError` with a
message that says what is wrong and where. The CLI prints these without a traceback; programming errors keep
their traceback.
"""

from __future__ import annotations


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


class ConfigError(EvoloraError):
    """A configuration value is invalid. The message names the key."""


class DamagedFileError(EvoloraError):
    """A file evolora wrote earlier cannot be read back (truncated, damaged, or an unsafe older format).

    `path` names the file; the message says what to do about it.
    """

    def __init__(self, path: object, message: str) -> None:
        super().__init__(message)
        self.path = path
