"""A stand-in for the `mlflow` module that appends every call to the file named by $FAKE_MLFLOW_LOG, one JSON
line each, so that calls made in worker processes can be checked (tests put this folder on sys.path)."""

from __future__ import annotations

import json
import os
import re
import sys
import types
import uuid
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


class _NotFound(Exception):
    error_code = "RESOURCE_DOES_NOT_EXIST"  # as MLflow's exception for a run not in the store


class _ActiveRun:  # as MLflow's: started already, ended by `end_run` or on leaving a `with`
    def __init__(self, run_id: str) -> None:
        self.info = SimpleNamespace(run_id=run_id)

    def __enter__(self) -> _ActiveRun:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        end_run("FINISHED" if kind is None else "FAILED")


def start_run(run_name: str | None = None, nested: bool = False, run_id: str | None = None) -> _ActiveRun:
    assert nested == bool(_open), "a run inside another must be nested"
    if run_id is None:
        run_id = uuid.uuid4().hex
        _write("made", run_id, run_name, _open[-1] if _open else None)
    else:
        get_run(run_id)
        _write("resumed", run_id)
    _open.append(run_id)
    return _ActiveRun(run_id)


def end_run(status: str = "FINISHED") -> None:
    _open.pop()


def get_run(run_id: str) -> Any:
    if not any(r[1:3] == ["made", run_id] for r in _records()):
        raise _NotFound(f"Run with id={run_id} not found")
    return SimpleNamespace(info=SimpleNamespace(lifecycle_stage="active"))


def MlflowClient() -> Any:
    return SimpleNamespace(log_batch=_log_batch)


def _log_batch(run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()) -> None:
    assert run_id == _open[-1], "logged into the run open now"
    for name in [m.key for m in metrics] + [p.key for p in params] + [t.key for t in tags]:
        if not re.fullmatch(r"[\w\-. /]{1,250}", name):  # as MLflow refuses it
            raise ValueError(f"Invalid value \"{name}\" for parameter 'name' supplied")
    if params:
        _write("params", run_id)
    for m in metrics:
        _write("metric", run_id, m.key, m.step)
    if tags:
        _write("tags", run_id)


def log_artifacts(local_dir: str, artifact_path: str | None = None) -> None:
    _write("artifacts", _open[-1], artifact_path)


# `from mlflow.entities import Metric, Param, RunTag`: the records a batch is made of
entities = types.ModuleType("mlflow.entities")
entities.Metric = lambda key, value, timestamp, step: SimpleNamespace(key=key, value=value, step=step)
entities.Param = lambda key, value: SimpleNamespace(key=key, value=value)
entities.RunTag = lambda key, value: SimpleNamespace(key=key, value=value)
sys.modules["mlflow.entities"] = entities
