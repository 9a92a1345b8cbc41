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
gate whose update was stopped after its version was recorded, parameters that could not be logged. A run
deleted from the store (or missing from it) is made anew and given everything again; any other failure to
ask the store about a run is not taken for its absence. Parameters are logged when a run is made (MLflow
refuses to change them later). Each stage's figures go in one batch (MLflow writes a batch whole), so a
failure while logging them leaves none to be logged twice. Under `--jobs N` the experiment's run is made by
the main process before the workers start, and each worker continues it and makes its own pairs' runs under
it (changes to `tracking.json` are made under a lock).

A missing MLflow, a tracking server that does not accept a connection, or a store MLflow cannot open stops
the command before any work (MLflow's own client retries a refused connection for minutes without a word).
A store that fails later is a warning: the run's own record is the reference, MLflow a view of it. Where
starting or ending a run fails, nothing more is logged in that sitting (each call would wait through
MLflow's retries), and the next command logs what is missing.

`tracking: none` (the default) logs nothing and needs nothing.

Past ~400 lines: what is continued, what is logged again and what a failure stops are one set of rules
about one store, kept together.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from evolora.config import RunConfig, config_to_dict
from evolora.errors import ConfigError, warn_once
from evolora.io import atomic_write_json, read_json

log = logging.getLogger("evolora")

STATE_FILE = "tracking.json"
URI_ENV = "MLFLOW_TRACKING_URI"  # the store when `tracking_uri` is not set
DEFAULT_STORE_KEY = "output_dir/mlflow.db"  # tracking.json's key of the store next to the runs


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


def check_tracking(cfg: RunConfig, open_store: bool = True) -> None:
    """Fail before any work when the configured tracker cannot be used: MLflow missing, a server that does
    not answer, and (with `open_store`: one process of a launch opens it) a store MLflow cannot open."""
    if cfg.tracking == "mlflow":
        _mlflow()
        _check_server_answers(store_uri(cfg))
        if open_store:
            MlflowTracker(cfg, Path(cfg.output_dir) / cfg.name).open_store(cfg)
    elif cfg.tracking_uri:  # said, not silent: a store given without `tracking: mlflow` gets nothing
        log.warning(
            "tracking_uri %s is not used with tracking: none: nothing is logged (--set tracking=mlflow logs "
            "there)",
            shown_uri(cfg.tracking_uri),
        )


def store_uri(cfg: RunConfig) -> str:
    """Where `tracking: mlflow` logs: `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a local SQLite."""
    # MLflow's own variable comes next, as in other tools that log to MLflow: a team that points every
    # tool at its server with it should not find evolora's runs in a local file instead.
    return cfg.tracking_uri or os.environ.get(URI_ENV) or _default_store(cfg)


_CREDENTIALS = re.compile(r"(://[^/@:\s]*:)([^/@\s]+)@")  # scheme://user:password@host


def shown_uri(uri: str) -> str:
    """`uri` with its password (`scheme://user:password@host`) replaced by ***: as messages, parameters and
    tracking.json show it (MLFLOW_TRACKING_PASSWORD keeps it out of the config altogether)."""
    return _CREDENTIALS.sub(r"\1***@", uri)


def scrubbed(text: str, uri: str) -> str:
    """`text` (an error MLflow raised, which may quote the store's address) with `uri`'s password as ***."""
    found = _CREDENTIALS.search(uri)
    return text if found is None else text.replace(f":{found.group(2)}@", ":***@")


def _default_store(cfg: RunConfig) -> str:
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def _place(location: str) -> Path | str:
    """An artifact location as a local folder where it names one (a `file:` URI or a path, which MLflow may
    store written either way), else the URI as it is."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if not parsed.scheme and Path(location).is_absolute():
        return Path(location).resolve()
    return location


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
        raise ConfigError(f"tracking: {shown_uri(uri)} is not a usable server address: {e}") from None
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(
            f"tracking: no MLflow server answers at {shown_uri(uri)} ({e.strerror or type(e).__name__}); "
            "start it (`mlflow server --port N`) or give another tracking_uri / $MLFLOW_TRACKING_URI"
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

    def __init__(self, root: Path, uri: str, legacy: str | None = None) -> None:
        self.path = root / STATE_FILE
        self.uri = uri
        self.legacy = legacy  # the key an older evolora gave this store

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{STATE_FILE}.lock", "a", encoding="utf-8") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            whole = self._read()
            if self.uri not in whole and self.legacy in whole:
                whole[self.uri] = whole.pop(self.legacy)
            mine = whole.setdefault(self.uri, {})
            mine.setdefault("runs", {})
            mine.setdefault("gates", {})
            yield mine
            atomic_write_json(self.path, whole)

    def migrate(self) -> None:
        """Move the store's part from the key an older evolora gave it (a password in it included) to its
        own key now, rather than at the next change (a finished experiment may log nothing again)."""
        if self.legacy is not None and self.path.is_file():
            whole = self._read()
            if self.legacy in whole and self.uri not in whole:
                with self.change():
                    pass

    def get(self) -> dict[str, Any]:
        whole = self._read()
        return {"runs": {}, "gates": {}, **whole.get(self.uri, whole.get(self.legacy, {}))}

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        return read_json(self.path, "Delete it: the MLflow runs are then made anew with everything logged.")


class MlflowTracker(Tracker):
    """Logs to MLflow. A failure to reach the store stops the run before any work; a failure later is a
    warning (the run's own record is the reference, MLflow a view of it)."""

    def __init__(self, cfg: RunConfig, root: Path) -> None:
        self.mlflow = _mlflow()
        out = Path(cfg.output_dir).resolve()
        self.uri = store_uri(cfg)
        # A tracking server keeps artifacts in its own store, where everyone who reads the server finds
        # them; a store without a server (SQLite, files, a database) has none, so they go next to the runs.
        self.artifacts = None if _served(self.uri) else (out / "mlartifacts").as_uri()
        # The store next to the runs is keyed by where it lies relative to them, so a runs folder moved or
        # copied with its mlflow.db continues its MLflow runs (keyed by its absolute path, it made new ones).
        default = self.uri == _default_store(cfg)
        key = DEFAULT_STORE_KEY if default else shown_uri(self.uri)
        # Keyed before by the path or the whole URI (a password included): continued under the new key.
        self.state = _State(Path(root), key, legacy=self.uri if key != self.uri else None)
        self.state.migrate()
        self.key: str | None = None  # the (strategy, seed) run open now
        self.run_id: str | None = None  # and its id
        self.down: str | None = None  # why the store failed in this sitting: nothing more is logged
        self.artifacts_elsewhere: str | None = None  # the moved store's artifact place (adapters not logged)

    def open_store(self, cfg: RunConfig) -> None:
        try:
            if self.artifacts is not None and self.uri == _default_store(cfg):
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # where the SQLite file goes
            self.mlflow.set_tracking_uri(self.uri)
            experiment = self.mlflow.get_experiment_by_name(cfg.name)
            if experiment is None:
                self.mlflow.create_experiment(cfg.name, artifact_location=self.artifacts)
            elif self.artifacts is not None and self.uri == _default_store(cfg):
                self._check_artifact_place(getattr(experiment, "artifact_location", None))
            self.mlflow.set_experiment(cfg.name)
        except Exception as e:
            raise self._unusable(e) from None

    def _check_artifact_place(self, recorded: str | None) -> None:
        """The store next to the runs keeps the artifact place its experiment was made with: moved or copied
        with the runs, that is the old folder's, and MLflow cannot change it. Adapters are then not logged
        (they would land in the old folder, or in the copy it was made from); figures still are."""
        if recorded is None or self.artifacts is None or _place(recorded) == _place(self.artifacts):
            return
        self.artifacts_elsewhere = recorded
        warn_once(
            log,
            "mlflow artifacts elsewhere",
            "the MLflow store next to the runs was moved or copied with them: its experiment keeps its "
            "artifacts at %s (MLflow cannot change that), so stage adapters are not logged as MLflow "
            "artifacts from here (they are in the run folders); figures and parameters are",
            recorded,
        )

    @contextlib.contextmanager
    def experiment(self, cfg: RunConfig) -> Iterator[None]:
        self.open_store(cfg)
        kept = self.state.get()
        try:
            made = self._gone(kept.get("experiment"))
        except Exception as e:
            raise self._unusable(e) from None
        start = {"run_name": cfg.name} if made else {"run_id": kept["experiment"]}
        with self._active("the experiment's run", required=True, **start) as active:
            if made:
                with self.state.change() as state:
                    # Runs nested under a parent that is gone are not continued: one tree per experiment.
                    state.update(experiment=active.info.run_id, runs={}, gates={}, gate_runs={})
                    state.pop("params_missing", None)
            settings = config_to_dict(cfg)
            if cfg.tracking_uri:
                settings["tracking_uri"] = shown_uri(cfg.tracking_uri)
            self._params(None, made, kept, active.info.run_id, settings)
            yield

    @contextlib.contextmanager
    def run(self, label: str, seed: int, params: dict[str, Any], run_dir: Path) -> Iterator[None]:
        key = _run_key(label, seed)
        kept = self.state.get()["runs"].get(key, {})
        start: dict[str, Any] = {}
        if self.down is None:
            try:
                start = {"run_name": key} if self._gone(kept.get("id")) else {"run_id": kept["id"]}
            except Exception as e:
                self._went_down(f"looking up the run of {key}", e)
        with self._active(f"the run of {key}", **({"nested": True, **start} if start else {})) as active:
            if active is not None:
                made = active.info.run_id != kept.get("id")
                if made:
                    with self.state.change() as state:
                        state["runs"][key] = {"id": active.info.run_id, "stages": []}
                self._params(key, made, kept, active.info.run_id, params)
                self.key, self.run_id = key, active.info.run_id
            try:
                # Stages finished in earlier sittings that this run has not logged
                results = run_dir / "results.json"
                if active is not None and results.is_file():
                    for record in read_json(results, "Rerun the experiment: it is rebuilt.")["stages"]:
                        self.stage(record, run_dir / f"stage-{record['train_stage']}")
                yield
            finally:
                self.key = self.run_id = None

    def stage(self, record: dict[str, Any], stage_dir: Path) -> None:
        t = int(record["train_stage"])
        key, run_id = self.key, self.run_id
        if key is None or run_id is None or self.down is not None:
            return
        logged = self.state.get()["runs"].get(key, {})
        if t in logged.get("stages", []):
            return
        # A stage's figures and its adapters are noted apart: figures logged before a failed upload (or a
        # kill during it) are not logged a second time by the next run.
        if t not in logged.get("figures", []):
            figures = _figures(record)
            if not self._logged(
                f"stage {t}", "the next run of the experiment logs it", lambda: self._batch(run_id, figures)
            ):
                return
            with self.state.change() as state:
                state["runs"].setdefault(key, {}).setdefault("figures", []).append(t)
        if self._logged(
            f"stage {t}'s adapters",
            "the next run of the experiment logs them",
            lambda: self._adapters(t, stage_dir),
        ):
            with self.state.change() as state:
                state["runs"].setdefault(key, {}).setdefault("stages", []).append(t)

    def _adapters(self, t: int, stage_dir: Path) -> None:
        adapters = stage_dir / "trained" / "adapters"
        if adapters.is_dir() and self.artifacts_elsewhere is None:
            self.mlflow.log_artifacts(str(adapters), artifact_path=f"stage-{t}/adapters")

    def gate(self, method: str, seed: int, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        key = _run_key(method, seed)
        if self.down is not None or version in self.state.get()["gates"].get(key, []):
            return
        if self._logged(f"the gate of version {version}", "rerunning the update logs it",
                   lambda: self._gate(key, version, gate, data)):  # fmt: skip
            with self.state.change() as state:
                state["gates"].setdefault(key, []).append(version)

    def _gate(self, key: str, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        """The gate's run, made once: its id is kept before anything is logged in it, so a retry after a
        failure logs into it rather than making another; its figures, parameters and tags go in one batch."""
        name = f"update of {key} to version {version}"
        made = self.state.get().get("gate_runs", {}).get(name)
        start = {"run_name": name} if self._gone(made) else {"run_id": made}
        with self._active(f"the run of {name}", nested=True, **start) as active:
            if active is None:
                raise ConnectionError(self.down)
            if active.info.run_id != made:
                with self.state.change() as state:
                    state.setdefault("gate_runs", {})[name] = active.info.run_id
            figures = [(f"gate.{n}", float(gate[n]), 0) for n in ("candidate", "promoted", "gain", "min_gain")
                       if gate.get(n) is not None]  # fmt: skip  # null: undefined on the held-out samples
            params = {
                "run": key,
                "version": version,
                "file": data.get("file"),
                "accepted": data.get("accepted"),
            }
            tags = {"gate.decision": gate["decision"], "gate.metric": gate["metric"]}
            self._batch(active.info.run_id, figures, params, tags)

    # ------------------------------------------------------------------ the store's answers
    def _unusable(self, e: Exception) -> ConfigError:
        shown = shown_uri(self.uri)
        why = scrubbed(str(e), self.uri)
        return ConfigError(f"tracking: cannot use MLflow at {shown}: {type(e).__name__}: {why}")

    def _gone(self, run_id: str | None) -> bool:
        """Whether run `run_id` is missing from the store or deleted (a new one is made). Any other failure
        to ask raises: a store that does not answer says nothing about the run."""
        if not run_id:
            return True
        try:
            return self.mlflow.get_run(run_id).info.lifecycle_stage != "active"
        except Exception as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return True
            raise

    @contextlib.contextmanager
    def _active(self, what: str, required: bool = False, **start: Any) -> Iterator[Any]:
        """The run `start_run(**start)` opens, ended on leaving as its body ended (FINISHED, KILLED, FAILED).
        Where the store fails to start it (or failed before in this sitting): `ConfigError` if `required`,
        else None, and nothing more is logged in this sitting."""
        active = None
        if self.down is None and start:
            try:
                active = self.mlflow.start_run(**start)
            except Exception as e:
                if required:
                    raise self._unusable(e) from None
                self._went_down(f"starting {what}", e)
        status = "FINISHED"
        try:
            yield active
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if active is not None:
                try:
                    self.mlflow.end_run(status)
                except Exception as e:
                    self._went_down(f"ending {what}", e)

    def _logged(self, what: str, later: str, log_it: Callable[[], None]) -> bool:
        """Run `log_it`; a failure is a warning (the run's own record is the reference, MLflow a view of
        it)."""
        try:
            log_it()
        except Exception as e:
            why = scrubbed(str(e), self.uri)
            log.warning("MLflow: %s not logged (%s: %s); %s", what, type(e).__name__, why, later)
            return False
        return True

    def _went_down(self, what: str, e: Exception) -> None:
        self.down = f"{type(e).__name__}: {scrubbed(str(e), self.uri)}"
        log.warning(
            "MLflow: %s failed (%s); nothing more is logged in this sitting, the next command logs what is "
            "missing",
            what,
            self.down,
        )

    def _batch(
        self,
        run_id: str,
        metrics: Sequence[tuple[str, float, int]] = (),
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        """Log to `run_id` in one `log_batch` (MLflow stores a batch whole): `metrics` as (name, value,
        step), `params` (flattened) and `tags` as mappings, all named as MLflow takes names."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.mlflow.MlflowClient().log_batch(
            run_id,
            metrics=[Metric(metric_name(k), v, now, step) for k, v, step in metrics],
            params=[Param(metric_name(k), _param_value(k, v)) for k, v in _flat(params or {}).items()],
            tags=[RunTag(metric_name(k), str(v)) for k, v in (tags or {}).items()],
        )

    def _params(self, key: str | None, made: bool, kept: dict[str, Any], run_id: str, params: dict) -> None:
        """A run's parameters, logged when it is made, or later where that failed (MLflow refuses to change
        them, so they are not logged again); `key` None: the experiment's run."""
        if not made and not kept.get("params_missing"):
            return
        logged = self._logged(
            "the parameters", "the next command logs them", lambda: self._batch(run_id, params=params)
        )
        if logged == made:  # logged as the run was made, or still missing: nothing to note
            return
        with self.state.change() as state:
            mine = state["runs"].setdefault(key, {}) if key is not None else state
            if logged:
                mine.pop("params_missing", None)
            else:
                mine["params_missing"] = True


def _figures(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """A stage record's figures as (name, value, step): its metrics, seconds and cost parts at step = stage,
    each epoch's numbers at step = epoch (prefixed by the stage and job). Undefined (null in results.json):
    NaN."""
    t = int(record["train_stage"])
    out = [(k, math.nan if v is None else float(v), t) for k, v in record["metrics"].items()]
    out.append(("train_seconds", float(record["train_seconds"]), t))
    cost = record.get("cost") or {}  # where the stage's time went (records before the profile lack it)
    if "total_seconds" in cost:
        out.append(("cost.total_seconds", float(cost["total_seconds"]), t))
    out += [
        (f"cost.{part}_seconds", float(spent["seconds"]), t) for part, spent in cost.get("parts", {}).items()
    ]
    for job in record["jobs"]:
        for epoch in job["history"]:
            for key, value in epoch.items():
                if key != "epoch" and (value is None or isinstance(value, int | float)):
                    number = math.nan if value is None else float(value)
                    out.append((f"stage{t}.{job['job']}.{key}", number, int(epoch["epoch"])))
    return out


PARAM_LIMIT = 6000  # MLflow's longest parameter value since 2.8 (2.10, the extra's floor, included)


def _param_value(name: str, value: Any) -> str:
    """`value` as MLflow stores a parameter: its text, cut to MLflow's limit with a warning naming it (a
    strategies list with many options can pass it; the whole value is in the experiment's config.yaml)."""
    text = str(value)
    if len(text) <= PARAM_LIMIT:
        return text
    warn_once(
        log,
        f"mlflow-param-cut-{name}",
        "MLflow: parameter %s is %d characters, past MLflow's %d: logged cut short (config.yaml holds "
        "it whole)",
        name,
        len(text),
        PARAM_LIMIT,
    )
    return text[:PARAM_LIMIT]


def metric_name(name: str) -> str:
    """A name as MLflow takes it for a figure, parameter or tag: letters, digits and `_-. /` only (`hit@10` is
    `hit_at_10`, a data file `ratings (2024).csv` is `ratings _2024_.csv`; MLflow 2 refuses `:`), at most 250
    characters (a longer one keeps its start and a hash of the whole)."""
    name = re.sub(r"[^\w\-. /]", "_", name.replace("@", "_at_"))
    if len(name) > 250:
        name = f"{name[:237]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def _run_key(method: str, seed: int) -> str:
    """A (strategy, seed) run's name in MLflow and its key in `tracking.json`."""
    return f"{method} seed {seed}"


def tracker_for(cfg: RunConfig, root: Path) -> Tracker:
    """The tracker `cfg` asks for; `root` is the experiment's folder (where `tracking.json` is kept)."""
    return MlflowTracker(cfg, root) if cfg.tracking == "mlflow" else Tracker()
