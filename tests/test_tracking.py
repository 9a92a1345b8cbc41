"""`tracking: mlflow`: what is logged where, checked against a recording stand-in for the mlflow module (the
real one is an optional extra, `pip install 'evolora[mlflow]'`)."""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

import polars as pl
import pytest

from evolora.deploy.update import update_run
from evolora.errors import ConfigError
from evolora.experiment import run_experiment
from tests.helpers import EXAMPLE_TABLE, tiny_config

HERE = Path(__file__).resolve().parent / "data"


class Recorder(types.ModuleType):
    """Records the calls evolora makes, with the run they were made in."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)  # libraries probe for mlflow
        self.calls: list[tuple] = []
        self.stack: list[str] = []

    def set_tracking_uri(self, uri: str) -> None:
        self.calls.append(("uri", uri))

    def set_experiment(self, name: str) -> None:
        self.calls.append(("experiment", name))

    def get_experiment_by_name(self, name: str) -> None:
        return None

    def create_experiment(self, name: str, artifact_location: str) -> None:
        self.calls.append(("created", name, artifact_location))

    @contextlib.contextmanager
    def start_run(self, run_name: str, nested: bool = False):
        assert nested == bool(self.stack), "a run inside another must be nested"
        self.stack.append(run_name)
        try:
            yield
        finally:
            self.stack.pop()

    def log_params(self, params: dict) -> None:
        self.calls.append(("params", tuple(self.stack), dict(params)))

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.calls.append(("metric", tuple(self.stack), key, value, step))

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        assert Path(local_dir).is_dir()
        self.calls.append(("artifacts", tuple(self.stack), artifact_path))

    def set_tags(self, tags: dict) -> None:
        self.calls.append(("tags", tuple(self.stack), dict(tags)))


@pytest.fixture
def mlflow(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "mlflow", recorder)
    return recorder


def test_runs_stages_epochs_adapters_and_gates_are_logged(mlflow: Recorder, tmp_path: Path) -> None:
    log = pl.read_csv(HERE / "example_log.csv").sort("ts")
    cut = int(log.height * 0.8)
    log[:cut].write_csv(tmp_path / "base.csv")
    log[cut:].write_csv(tmp_path / "new.csv")
    over = {
        **EXAMPLE_TABLE,
        "train.epochs": 2,
        "train.samples_per_stage": 24,
        "strategies": "[frozen, finetune]",
        "seeds": "[0, 1]",
        "tracking": "mlflow",
    }
    cfg = tiny_config(tmp_path / "base.csv", tmp_path / "runs", **over)
    run_experiment(cfg)
    assert ("experiment", "t") in mlflow.calls
    assert any(c[0] == "uri" and c[1].startswith("sqlite:///") for c in mlflow.calls)
    assert any(c[0] == "created" and c[2].endswith("mlartifacts") for c in mlflow.calls)
    runs = {c[1] for c in mlflow.calls if c[0] == "params" and len(c[1]) == 2}
    assert runs == {("t", f"{m} seed {s}") for m in ("frozen", "finetune") for s in (0, 1)}
    finetune = ("t", "finetune seed 0")
    stage_metrics = [(c[2], c[4]) for c in mlflow.calls if c[0] == "metric" and c[1] == finetune]
    assert ("auc", 1) in stage_metrics and ("auc", 2) in stage_metrics
    assert ("stage2.default.train_loss", 2) in stage_metrics  # per epoch, step = epoch
    assert ("artifacts", finetune, "stage-2/adapters") in mlflow.calls
    update_run(Path(cfg.output_dir) / cfg.name, tmp_path / "new.csv", method="finetune")
    gate = [c for c in mlflow.calls if c[0] == "metric" and c[1] == ("t", "update to version 1")]
    assert {c[2] for c in gate} == {"gate.candidate", "gate.promoted", "gate.gain", "gate.min_gain"}
    assert any(c[0] == "tags" and "gate.decision" in c[2] for c in mlflow.calls)


def test_mlflow_missing_is_a_config_error_before_any_work(
    monkeypatch: pytest.MonkeyPatch, sunny_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow")
    with pytest.raises(ConfigError, match=r"pip install 'evolora\[mlflow\]'"):
        run_experiment(cfg)
    assert not (tmp_path / cfg.name).exists()
