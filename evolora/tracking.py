"""Experiment tracking: optional MLflow logging of runs, stages, epochs, adapters and update gates.

`tracking: mlflow` (with `pip install 'evolora[mlflow]'`) logs to `tracking_uri` (default: a local SQLite
store, `<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`): one MLflow run per experiment,
and nested under it one per (strategy, seed) with the settings as parameters, each stage's metrics (step =
training stage), each epoch's training and validation numbers (step = epoch, prefixed by the stage and
job), and each stage's adapters as artifacts. An update logs its gate (both figures, the gain, the
decision) as a run nested under the experiment.

`tracking: none` (the default) logs nothing and needs nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evolora.config import RunConfig, config_to_dict
from evolora.errors import ConfigError

log = logging.getLogger("evolora")


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError("tracking: mlflow needs MLflow: pip install 'evolora[mlflow]'") from None
    return mlflow


def check_tracking(cfg: RunConfig) -> None:
    """Fail before any work when the configured tracker cannot be used."""
    if cfg.tracking == "mlflow":
        _mlflow()


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

    @contextlib.contextmanager
    def experiment(self, cfg: RunConfig) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def run(self, label: str, seed: int, params: dict[str, Any]) -> Iterator[None]:
        yield

    def stage(self, record: dict[str, Any], stage_dir: Path) -> None:
        pass

    def gate(self, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        pass


class MlflowTracker(Tracker):
    """Logs to MLflow. A failure to reach the store stops the run before any work; a failure while logging
    a stage is a warning (the run's own record is the reference, MLflow a view of it)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.mlflow = _mlflow()
        out = Path(cfg.output_dir).resolve()
        self.uri = cfg.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
        self.artifacts = (out / "mlartifacts").as_uri()

    @contextlib.contextmanager
    def experiment(self, cfg: RunConfig) -> Iterator[None]:
        try:
            self.mlflow.set_tracking_uri(self.uri)
            if self.mlflow.get_experiment_by_name(cfg.name) is None:
                self.mlflow.create_experiment(cfg.name, artifact_location=self.artifacts)
            self.mlflow.set_experiment(cfg.name)
        except Exception as e:
            raise ConfigError(f"tracking: cannot use MLflow at {self.uri}: {type(e).__name__}: {e}") from None
        with self.mlflow.start_run(run_name=cfg.name):
            params = _flat(config_to_dict(cfg))
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            yield

    @contextlib.contextmanager
    def run(self, label: str, seed: int, params: dict[str, Any]) -> Iterator[None]:
        with self.mlflow.start_run(run_name=f"{label} seed {seed}", nested=True):
            self.mlflow.log_params({k: str(v)[:500] for k, v in _flat(params).items()})
            yield

    def stage(self, record: dict[str, Any], stage_dir: Path) -> None:
        try:
            self._stage(record, stage_dir)
        except Exception as e:
            log.warning(
                "MLflow: stage %s not logged (%s: %s)", record.get("train_stage"), type(e).__name__, e
            )

    def _stage(self, record: dict[str, Any], stage_dir: Path) -> None:
        t = int(record["train_stage"])
        for name, value in record["metrics"].items():
            self.mlflow.log_metric(name, float(value), step=t)
        self.mlflow.log_metric("train_seconds", float(record["train_seconds"]), step=t)
        for job in record["jobs"]:
            for epoch in job["history"]:
                for key, value in epoch.items():
                    if key != "epoch" and isinstance(value, int | float):
                        name = f"stage{t}.{job['job']}.{key}"
                        self.mlflow.log_metric(name, float(value), step=int(epoch["epoch"]))
        adapters = stage_dir / "trained" / "adapters"
        if adapters.is_dir():
            self.mlflow.log_artifacts(str(adapters), artifact_path=f"stage-{t}/adapters")

    def gate(self, version: int, gate: dict[str, Any], data: dict[str, Any]) -> None:
        with self.mlflow.start_run(run_name=f"update to version {version}", nested=True):
            self.mlflow.log_params(
                {"version": version, "file": data.get("file"), "accepted": data.get("accepted")}
            )
            for key in ("candidate", "promoted", "gain", "min_gain"):
                self.mlflow.log_metric(f"gate.{key}", float(gate[key]))
            self.mlflow.set_tags({"gate.decision": gate["decision"], "gate.metric": gate["metric"]})


def tracker_for(cfg: RunConfig) -> Tracker:
    return MlflowTracker(cfg) if cfg.tracking == "mlflow" else Tracker()
