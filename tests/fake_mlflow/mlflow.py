"""A stand-in for the `mlflow` module that appends every call to the file named by $FAKE_MLFLOW_LOG, one JSON
line each, so that calls made in worker processes can be checked (tests put this folder on sys.path)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

_open: list[str] = []  # the ids of this process's open runs, innermost last


def _write(*record: Any) -> None:
    # One short line per O_APPEND write: lines from several processes do not interleave.
    with open(os.environ["FAKE_MLFLOW_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps([os.getpid(), *record]) + "\n")


def _records() -> list[list[Any]]:
    path = os.environ["FAKE_MLFLOW_LOG"]
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def set_tracking_uri(uri: str) -> None:
    pass


def get_experiment_by_name(name: str) -> Any:
    return next((True for r in _records() if r[1:3] == ["created", name]), None)


def create_experiment(name: str, artifact_location: str) -> None:
    _write("created", name)


def set_experiment(name: str) -> None:
    pass


@contextlib.contextmanager
def start_run(run_name: str | None = None, nested: bool = False, run_id: str | None = None) -> Iterator[Any]:
    assert nested == bool(_open), "a run inside another must be nested"
    if run_id is None:
        run_id = uuid.uuid4().hex
        _write("made", run_id, run_name, _open[-1] if _open else None)
    else:
        get_run(run_id)
        _write("resumed", run_id)
    _open.append(run_id)
    try:
        yield SimpleNamespace(info=SimpleNamespace(run_id=run_id))
    finally:
        _open.pop()


def get_run(run_id: str) -> Any:
    if not any(r[1:3] == ["made", run_id] for r in _records()):
        raise LookupError(f"Run with id={run_id} not found")
    return SimpleNamespace(info=SimpleNamespace(lifecycle_stage="active"))


def log_params(params: dict[str, Any]) -> None:
    _write("params", _open[-1])


def log_metric(key: str, value: float, step: int | None = None) -> None:
    if not re.fullmatch(r"[\w\-. :/]*", key):  # as MLflow refuses it
        raise ValueError(f"Invalid value \"{key}\" for parameter 'name' supplied")
    _write("metric", _open[-1], key, step)


def log_artifacts(local_dir: str, artifact_path: str | None = None) -> None:
    _write("artifacts", _open[-1], artifact_path)


def set_tags(tags: dict[str, Any]) -> None:
    _write("tags", _open[-1])
