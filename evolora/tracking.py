"""Experiment tracking: optional MLflow logging of runs, stages, epochs, adapters and update gates.

`tracking: mlflow` (with `pip install 'evolora[mlflow]'`) logs to `tracking_uri` (unset:
`$MLFLOW_TRACKING_URI`, else a local SQLite store, `<output_dir>/mlflow.db`, artifacts in
`<output_dir>/mlartifacts`; with a tracking server, its own artifact store): one MLflow run per experiment,
and nested under it one per (strategy, seed) with the settings as parameters, each stage's metrics (step =
training stage), each stage's cost profile (`cost.<part>_seconds`, step = stage), each epoch's training and
validation numbers (step = epoch, prefixed by the stage and job), and each stage's adapters as artifacts. An
update logs its gate (both figures, the gain, the decision) as a run nested under the experiment.

Reruns continue the MLflow runs they made before rather than opening new ones: the run ids, and which
stages and gates each has logged, are kept per store in `<experiment>/tracking.json`. A resumed experiment
logs into the same runs, and every command logs what its runs lack: a stage finished in a sitting that was
stopped before logging it, every finished stage of an experiment that ran with `tracking: none` before, a
gate whose update was stopped after its version was recorded. A run deleted from the store is made anew and
given everything again. Parameters are logged when a run is made (MLflow refuses to change them later).
Under `--jobs N` the experiment's run is made by the main process before the workers start, and each worker
continues it and makes its own pairs' runs under it (changes to `tracking.json` are made under a lock).

A tracking server that does not accept a connection stops the command before any work, at once: MLflow's own
client retries a refused connection for minutes without a word.

`tracking: none` (the default) logs nothing and needs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evolora.config import RunConfig, config_to_dict
from evolora.errors import ConfigError
from evolora.io import atomic_write_json, read_json

log = logging.getLogger("evolora")

STATE_FILE = "tracking.json"
URI_ENV = "MLFLOW_TRACKING_URI"  # the store when `tracking_uri` is not set


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as e:
        if e.name == "mlflow":
            raise ConfigError("tracking: mlflow needs MLflow: pip install 'evolora[mlflow]'") from None
        broken = e
    except Exception as e:  # an installed MLflow at odds with its environment fails in many ways
        broken = e
    else:
        return mlflow
    # Installed but not importable: "pip install" would not help, the missing piece does.
    raise ConfigError(
        f"tracking: MLflow is installed but cannot be imported here: {type(broken).__name__}: {broken}"
    ) from None


def check_tracking(cfg: RunConfig) -> None:
    """Fail before any work when the configured tracker cannot be used."""
    if cfg.tracking == "mlflow":
        _mlflow()
        _check_server_answers(store_uri(cfg))


def store_uri(cfg: RunConfig) -> str:
    """Where `tracking: mlflow` logs: `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a local SQLite."""
    # MLflow's own variable comes next, as in other tools that log to MLflow: a team that points every
    # tool at its server with it should not find evolora's runs in a local file instead.
    return (
        cfg.tracking_uri
        or os.environ.get(URI_ENV)
        or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"
    )


def _served(uri: str) -> bool:
    """Whether `uri` names an MLflow tracking server (which has an artifact store of its own)."""
    scheme = uri.split(":", 1)[0].lower()
    return scheme in ("http", "https") or scheme.startswith("databricks")


def _check_server_answers(uri: str, timeout: float = 10.0) -> None:
    """Raise `ConfigError` at once when nothing listens at an http(s) tracking URI's host and port.

    MLflow retries a refused connection with growing back-off for minutes before it fails, and says nothing
    meanwhile; a server that is down or a wrong port is the usual cause. Only the connection is tried: the
    server's answers (authentication, its API) are MLflow's to judge, after this."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:  # a port that is not a number, or out of range
        raise ConfigError(f"tracking: {uri} is not a usable server address: {e}") from None
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(
            f"tracking: no MLflow server answers at {uri} ({e.strerror or type(e).__name__}); start it "
            "(`mlflow server --port N`) or give another tracking_uri / $MLFLOW_TRACKING_URI"
        ) from None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """What the experiment tells a tracker; this base class logs nothing."""

    def open_store(self, cfg: RunConfig) -> None:
        """Reach the store, or raise `ConfigError` (before work whose logging would fail)."""

    @contextlib.contextmanager
    def experiment(self, cfg: RunConfig) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def run(self, label: str, seed: int, params: dict[str, Any], run_dir: Path) -> Iterator[None]:
        yield

    def stage(self, record: dict[str, Any], stage_dir: Path) -> None:
        pass

    def gate(self, method: str, seed: int, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        pass


class _State:
    """This store's part of `tracking.json`: {"experiment": id, "runs": {key: {"id", "stages"}}, "gates":
    {key: [version, ...]}}. Each change is written at once, under a lock (an update may log while the
    experiment still runs other strategies)."""

    def __init__(self, root: Path, uri: str) -> None:
        self.path = root / STATE_FILE
        self.uri = uri

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{STATE_FILE}.lock", "a", encoding="utf-8") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            whole = self._read()
            mine = whole.setdefault(self.uri, {})
            mine.setdefault("runs", {})
            mine.setdefault("gates", {})
            yield mine
            atomic_write_json(self.path, whole)

    def get(self) -> dict[str, Any]:
        return {"runs": {}, "gates": {}, **self._read().get(self.uri, {})}

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        return read_json(self.path, "Delete it: the MLflow runs are then made anew with everything logged.")


class MlflowTracker(Tracker):
    """Logs to MLflow. A failure to reach the store stops the run before any work; a failure while logging
    a stage is a warning (the run's own record is the reference, MLflow a view of it)."""

    def __init__(self, cfg: RunConfig, root: Path) -> None:
        self.mlflow = _mlflow()
        out = Path(cfg.output_dir).resolve()
        self.uri = store_uri(cfg)
        # A tracking server keeps artifacts in its own store, where everyone who reads the server finds
        # them; a store without a server (SQLite, files, a database) has none, so they go next to the runs.
        self.artifacts = None if _served(self.uri) else (out / "mlartifacts").as_uri()
        self.state = _State(Path(root), self.uri)
        self.key: str | None = None  # the (strategy, seed) run open now

    def _usable(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.mlflow.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # not in this store
            return False

    def _log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in _flat(params).items()})

    def open_store(self, cfg: RunConfig) -> None:
        try:
            self.mlflow.set_tracking_uri(self.uri)
            if self.mlflow.get_experiment_by_name(cfg.name) is None:
                self.mlflow.create_experiment(cfg.name, artifact_location=self.artifacts)
            self.mlflow.set_experiment(cfg.name)
        except Exception as e:
            raise ConfigError(f"tracking: cannot use MLflow at {self.uri}: {type(e).__name__}: {e}") from None

    @contextlib.contextmanager
    def experiment(self, cfg: RunConfig) -> Iterator[None]:
        self.open_store(cfg)
        run_id = self.state.get().get("experiment")
        if self._usable(run_id):
            with self.mlflow.start_run(run_id=run_id):
                yield
            return
        with self.mlflow.start_run(run_name=cfg.name) as made:
            with self.state.change() as state:
                # Runs nested under a parent that is gone are not continued: one tree per experiment.
                state.update(experiment=made.info.run_id, runs={}, gates={})
            self._log_params(config_to_dict(cfg))
            yield

    @contextlib.contextmanager
    def run(self, label: str, seed: int, params: dict[str, Any], run_dir: Path) -> Iterator[None]:
        key = _run_key(label, seed)
        kept = self.state.get()["runs"].get(key, {})
        if self._usable(kept.get("id")):
            started = self.mlflow.start_run(run_id=kept["id"], nested=True)
        else:
            started = self.mlflow.start_run(run_name=key, nested=True)
        with started as active:
            if active.info.run_id != kept.get("id"):
                with self.state.change() as state:
                    state["runs"][key] = {"id": active.info.run_id, "stages": []}
                self._log_params(params)
            self.key = key
            try:
                # Stages finished in earlier sittings that this run has not logged
                results = run_dir / "results.json"
                if results.is_file():
                    for record in read_json(results, "Rerun the experiment: it is rebuilt.")["stages"]:
                        self.stage(record, run_dir / f"stage-{record['train_stage']}")
                yield
            finally:
                self.key = None

    def stage(self, record: dict[str, Any], stage_dir: Path) -> None:
        t = int(record["train_stage"])
        logged = self.state.get()["runs"].get(self.key, {}) if self.key is not None else {}
        if self.key is None or t in logged.get("stages", []):
            return
        # A stage's figures and its adapters are noted apart: figures logged before a failed upload (or a
        # kill during it) are not logged a second time by the next run.
        key = self.key
        if t not in logged.get("figures", []):
            if not _logged(
                f"stage {t}", "the next run of the experiment logs it", lambda: self._figures(record)
            ):
                return
            with self.state.change() as state:
                state["runs"].setdefault(key, {}).setdefault("figures", []).append(t)
        if _logged(
            f"stage {t}'s adapters",
            "the next run of the experiment logs them",
            lambda: self._adapters(t, stage_dir),
        ):
            with self.state.change() as state:
                state["runs"].setdefault(key, {}).setdefault("stages", []).append(t)

    def _figures(self, record: dict[str, Any]) -> None:
        t = int(record["train_stage"])
        for name, value in record["metrics"].items():  # undefined: null in results.json, NaN in MLflow
            self.mlflow.log_metric(metric_name(name), math.nan if value is None else float(value), step=t)
        self.mlflow.log_metric("train_seconds", float(record["train_seconds"]), step=t)
        cost = record.get("cost") or {}  # where the stage's time went (records before the profile lack it)
        if "total_seconds" in cost:
            self.mlflow.log_metric("cost.total_seconds", float(cost["total_seconds"]), step=t)
        for part, spent in cost.get("parts", {}).items():
            self.mlflow.log_metric(f"cost.{part}_seconds", float(spent["seconds"]), step=t)
        for job in record["jobs"]:
            for epoch in job["history"]:
                for key, value in epoch.items():  # None: undefined (NaN, -inf) as results.json holds it
                    if key != "epoch" and (value is None or isinstance(value, int | float)):
                        name = metric_name(f"stage{t}.{job['job']}.{key}")
                        number = math.nan if value is None else float(value)
                        self.mlflow.log_metric(name, number, step=int(epoch["epoch"]))

    def _adapters(self, t: int, stage_dir: Path) -> None:
        adapters = stage_dir / "trained" / "adapters"
        if adapters.is_dir():
            self.mlflow.log_artifacts(str(adapters), artifact_path=f"stage-{t}/adapters")

    def gate(self, method: str, seed: int, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        key = _run_key(method, seed)
        if version in self.state.get()["gates"].get(key, []):
            return
        if _logged(f"the gate of version {version}", "rerunning the update logs it",
                   lambda: self._gate(key, version, gate, data)):  # fmt: skip
            with self.state.change() as state:
                state["gates"].setdefault(key, []).append(version)

    def _gate(self, key: str, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        with self.mlflow.start_run(run_name=f"update of {key} to version {version}", nested=True):
            self.mlflow.log_params(
                {"run": key, "version": version, "file": data.get("file"), "accepted": data.get("accepted")}
            )
            for name in ("candidate", "promoted", "gain", "min_gain"):
                if gate.get(name) is not None:  # null: the metric is undefined on the held-out samples
                    self.mlflow.log_metric(f"gate.{name}", float(gate[name]))
            self.mlflow.set_tags({"gate.decision": gate["decision"], "gate.metric": gate["metric"]})


def metric_name(name: str) -> str:
    """A figure's name as MLflow takes it (letters, digits and `_-. :/` only): `hit@10` is `hit_at_10`."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def _run_key(method: str, seed: int) -> str:
    """A (strategy, seed) run's name in MLflow and its key in `tracking.json`."""
    return f"{method} seed {seed}"


def _logged(what: str, later: str, log_it: Callable[[], None]) -> bool:
    """Run `log_it`; a failure is a warning (the run's own record is the reference, MLflow a view of it)."""
    try:
        log_it()
    except Exception as e:
        log.warning("MLflow: %s not logged (%s: %s); %s", what, type(e).__name__, e, later)
        return False
    return True


def tracker_for(cfg: RunConfig, root: Path) -> Tracker:
    """The tracker `cfg` asks for; `root` is the experiment's folder (where `tracking.json` is kept)."""
    return MlflowTracker(cfg, root) if cfg.tracking == "mlflow" else Tracker()
