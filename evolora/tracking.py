"""Experiment tracking: optional MLflow logging of runs, stages, epochs, adapters and update gates.

`tracking: mlflow` (with `pip install 'evolora[mlflow]'`) logs to `tracking_uri` (default: a local file
store, `<output_dir>/mlruns`): one MLflow run per experiment, and nested under it one per (strategy, seed)
with the settings as parameters, each stage's metrics (step = training stage), each epoch's training and
validation numbers (step = epoch, prefixed by the stage and job), and each stage's adapters as artifacts.
An update logs its gate (both figures, the gain, the decision) as a run nested under the experiment.

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
    def __init__(self, cfg: RunConfig) -> None:
        self.mlflow = _mlflow()
        self.uri = cfg.tracking_uri or (Path(cfg.output_dir).resolve() / "mlruns").as_uri()

    @contextlib.contextmanager
    def experiment(self, cfg: RunConfig) -> Iterator[None]:
        self.mlflow.set_tracking_uri(self.uri)
        self.mlflow.set_experiment(cfg.name)
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
