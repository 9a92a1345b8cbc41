"""`tracking: mlflow`: what is logged where, checked against a recording stand-in for the mlflow module (the
real one is an optional extra, `pip install 'evolora[mlflow]'`)."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import math
import re
import socket
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from evolora import tracking
from evolora.cli import app
from evolora.config import RunConfig
from evolora.deploy.update import update_run
from evolora.errors import ConfigError
from evolora.experiment import run_experiment
from evolora.tracking import URI_ENV, MlflowTracker, check_tracking, metric_name, shown_uri
from tests.helpers import EXAMPLE_TABLE, split_example_log, tiny_config

HERE = Path(__file__).resolve().parent / "data"
GATE_RUN = "update of finetune seed 0 to version 1"  # the run an update logs its gate in


class NotFound(Exception):
    error_code = "RESOURCE_DOES_NOT_EXIST"  # as MLflow's exception for a run not in the store


def entities() -> types.ModuleType:
    """`mlflow.entities`: the records a batch is made of."""
    module = types.ModuleType("mlflow.entities")
    module.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(key=key, value=value, step=step)
    module.Param = lambda key, value: types.SimpleNamespace(key=key, value=value)
    module.RunTag = lambda key, value: types.SimpleNamespace(key=key, value=value)
    return module


class Recorder(types.ModuleType):
    """Records the calls evolora makes, with the run they were made in."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.__spec__ = importlib.machinery.ModuleSpec("mlflow", None)  # libraries probe for mlflow
        self.calls: list[tuple] = []
        self.stack: list[str] = []
        self.runs: dict[str, dict] = {}  # run id -> name, deleted, params
        self.ids: list[str] = []  # the ids of the open runs, as `stack` holds their names
        self.fail_in: str | None = None  # a batch of figures logged in the run of this name raises
        self.fail_artifacts = 0  # so many log_artifacts calls raise, the next ones work
        self.fail_start: set[str] = set()  # starting a run of these names raises
        self.fail_lookup: set[str] = set()  # asking for a run of these names raises (not "not found")
        self.fail_params = 0  # so many batches of parameters raise, the next ones work

    def set_tracking_uri(self, uri: str) -> None:
        if uri.startswith("foo:"):
            raise ValueError(f"no store for {uri}")
        self.calls.append(("uri", uri))

    def set_experiment(self, name: str) -> None:
        self.calls.append(("experiment", name))

    def get_experiment_by_name(self, name: str) -> types.SimpleNamespace | None:
        made = [c for c in self.calls if c[0] == "created" and c[1] == name]
        return types.SimpleNamespace(artifact_location=made[0][2]) if made else None

    def create_experiment(self, name: str, artifact_location: str) -> None:
        self.calls.append(("created", name, artifact_location))

    def start_run(self, run_name: str | None = None, nested: bool = False, run_id: str | None = None):
        assert nested == bool(self.stack), "a run inside another must be nested"
        if (run_name or self.runs.get(run_id, {}).get("name")) in self.fail_start:
            raise ConnectionError("the tracking server went away")
        if run_id is None:
            run_id = f"id{len(self.runs)}"
            self.runs[run_id] = {"name": run_name, "deleted": False, "params": {}}
            self.calls.append(("made", run_name))
        else:
            assert not self.runs[run_id]["deleted"], "MLflow refuses to start a deleted run"
            self.calls.append(("resumed", self.runs[run_id]["name"]))
        self.stack.append(self.runs[run_id]["name"])
        self.ids.append(run_id)
        recorder = self

        class ActiveRun:  # as MLflow's: started already, ended by `end_run` or on leaving a `with`
            info = types.SimpleNamespace(run_id=run_id)

            def __enter__(self):
                return self

            def __exit__(self, kind, *_):
                recorder.end_run("FINISHED" if kind is None else "FAILED")

        return ActiveRun()

    def end_run(self, status: str = "FINISHED") -> None:
        self.runs[self.ids[-1]]["status"] = status
        self.stack.pop()
        self.ids.pop()

    def get_run(self, run_id: str):
        if run_id not in self.runs:
            raise NotFound(f"Run with id={run_id} not found")
        if self.runs[run_id]["name"] in self.fail_lookup:
            raise ConnectionError("read timed out")
        stage = "deleted" if self.runs[run_id]["deleted"] else "active"
        return types.SimpleNamespace(info=types.SimpleNamespace(lifecycle_stage=stage))

    def MlflowClient(self):
        return types.SimpleNamespace(log_batch=self.log_batch)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """Checked and refused whole, as MLflow writes a batch."""
        assert run_id == self.ids[-1], "logged into the run open now"
        if self.fail_in is not None and self.stack[-1] == self.fail_in and metrics:
            raise ConnectionError("the tracking server went away")
        if self.fail_params and params:
            self.fail_params -= 1
            raise ConnectionError("the tracking server went away")
        for name in [m.key for m in metrics] + [p.key for p in params] + [t.key for t in tags]:
            if not re.fullmatch(r"[\w\-. /]{1,250}", name):  # as MLflow 2.10 refuses it
                raise ValueError(f"Invalid value \"{name}\" for parameter 'name' supplied")
        kept = self.runs[run_id]["params"]
        changed = [p.key for p in params if kept.get(p.key, p.value) != p.value]
        assert not changed, f"MLflow refuses to change a parameter: {changed}"
        if params:
            kept.update({p.key: p.value for p in params})
            self.calls.append(("params", tuple(self.stack), {p.key: p.value for p in params}))
        for m in metrics:
            self.calls.append(("metric", tuple(self.stack), m.key, m.value, m.step))
        if tags:
            self.calls.append(("tags", tuple(self.stack), {t.key: t.value for t in tags}))

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        assert Path(local_dir).is_dir()
        if self.fail_artifacts:
            self.fail_artifacts -= 1
            raise ConnectionError("the upload broke off")
        self.calls.append(("artifacts", tuple(self.stack), artifact_path))


@pytest.fixture
def mlflow(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "mlflow", recorder)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities())
    monkeypatch.delenv(URI_ENV, raising=False)  # the default store is tested, whatever this machine sets
    return recorder


def test_runs_stages_epochs_adapters_and_gates_are_logged(mlflow: Recorder, tmp_path: Path) -> None:
    split_example_log(tmp_path)
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
    assert {("cost.total_seconds", 2), ("cost.training_seconds", 2)} <= set(stage_metrics)
    assert ("artifacts", finetune, "stage-2/adapters") in mlflow.calls
    update_run(Path(cfg.output_dir) / cfg.name, tmp_path / "new.csv", method="finetune")
    gate = [c for c in mlflow.calls if c[0] == "metric" and c[1] == ("t", GATE_RUN)]
    assert {c[2] for c in gate} == {"gate.candidate", "gate.promoted", "gate.gain", "gate.min_gain"}
    assert any(c[0] == "tags" and "gate.decision" in c[2] for c in mlflow.calls)


def _open_experiment(cfg: RunConfig, out: Path) -> None:
    """What a run does with the store before any work: open (or make) the experiment and its run."""
    with MlflowTracker(cfg, out / cfg.name).experiment(cfg):
        pass


@pytest.fixture
def server() -> Iterator[str]:
    """The address of something listening on a local port (a tracking server, as far as connecting goes)."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"


@pytest.mark.parametrize(
    ("uri", "local"),
    [("server", False), ("databricks", False), ("sqlite:///x.db", True), ("file:///m", True)],
)
def test_artifacts_go_to_a_servers_store_and_next_to_the_runs_otherwise(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path, uri: str, local: bool, server: str
) -> None:
    uri = server if uri == "server" else uri
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow", tracking_uri=uri)
    _open_experiment(cfg, tmp_path)
    where = (tmp_path / "mlartifacts").resolve().as_uri() if local else None  # None: the server decides
    assert ("created", cfg.name, where) in mlflow.calls


def test_a_server_that_does_not_answer_stops_the_run_at_once(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path
) -> None:
    """MLflow itself retries a refused connection for minutes, silently."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        uri = f"http://127.0.0.1:{listening.getsockname()[1]}"  # closed below: nothing listens there
    cfg = tiny_config(sunny_dir, tmp_path / "out", tracking="mlflow", tracking_uri=uri)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"no MLflow server answers at {uri} .*tracking_uri"):
        run_experiment(cfg)
    assert time.monotonic() - started < 10 and not mlflow.calls
    assert not (tmp_path / "out" / cfg.name).exists()
    with pytest.raises(ConfigError, match="not a usable server address"):
        run_experiment(tiny_config(sunny_dir, tmp_path / "out", tracking="mlflow", tracking_uri="http://h:x"))


def test_mlflow_missing_is_a_config_error_before_any_work(
    monkeypatch: pytest.MonkeyPatch, sunny_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow")
    with pytest.raises(ConfigError, match=r"pip install 'evolora\[mlflow\]'"):
        run_experiment(cfg)
    assert not (tmp_path / cfg.name).exists()


def test_mlflows_own_variable_names_the_store_unless_the_config_does(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    monkeypatch.setenv(URI_ENV, server)
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow")
    _open_experiment(cfg, tmp_path)
    assert ("uri", server) in mlflow.calls and ("created", cfg.name, None) in mlflow.calls
    mlflow.calls.clear()
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow", tracking_uri="sqlite:///mine.db")
    _open_experiment(cfg, tmp_path)
    assert ("uri", "sqlite:///mine.db") in mlflow.calls


def test_an_mlflow_that_cannot_be_imported_says_why_not_to_install_it(
    monkeypatch: pytest.MonkeyPatch, sunny_dir: Path, tmp_path: Path
) -> None:
    # MLflow 2.10 on a recent setuptools: installed, but its own import of pkg_resources fails
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "mlflow.py").write_text("import evolora_test_missing_dependency\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "mlflow", raising=False)
    cfg = tiny_config(sunny_dir, tmp_path / "runs", tracking="mlflow")
    with pytest.raises(ConfigError, match=r"installed but cannot be imported.*evolora_test_missing_dep"):
        run_experiment(cfg)


def _made(mlflow: Recorder) -> list[str]:
    return [c[1] for c in mlflow.calls if c[0] == "made"]


def _stage_metrics(mlflow: Recorder, run: str) -> set[tuple[str, int]]:
    return {(c[2], c[4]) for c in mlflow.calls if c[0] == "metric" and c[1] == ("t", run)}


def test_reruns_continue_the_runs_they_made_and_log_what_those_lack(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    over = {
        **EXAMPLE_TABLE,
        "train.samples_per_stage": 24,
        "strategies": "[frozen, finetune]",
        "seeds": "[0]",
    }
    data, out = HERE / "example_log.csv", tmp_path / "runs"
    run_experiment(tiny_config(data, out, **over))  # tracking: none
    assert mlflow.calls == []

    # Tracking turned on for the finished experiment: every finished stage is logged.
    run_experiment(tiny_config(data, out, **over, tracking="mlflow"))
    assert _made(mlflow) == ["t", "frozen seed 0", "finetune seed 0"]
    for run in ("frozen seed 0", "finetune seed 0"):
        assert {("auc", 1), ("auc", 2)} <= _stage_metrics(mlflow, run)
    assert ("artifacts", ("t", "finetune seed 0"), "stage-2/adapters") in mlflow.calls

    # The same command again: the same runs, nothing logged twice (parameters included).
    mlflow.calls.clear()
    run_experiment(tiny_config(data, out, **over, tracking="mlflow", threads=1))
    assert _made(mlflow) == []
    assert [c[1] for c in mlflow.calls if c[0] == "resumed"] == ["t", "frozen seed 0", "finetune seed 0"]
    assert not [c for c in mlflow.calls if c[0] in ("metric", "params", "artifacts")]

    # A new seed whose logging fails: the run goes on with a warning, and the next command logs its
    # stages into the run it made.
    mlflow.calls.clear()
    mlflow.fail_in = "finetune seed 1"
    with caplog.at_level(logging.WARNING, logger="evolora"):
        run_experiment(tiny_config(data, out, **{**over, "seeds": "[0, 1]"}, tracking="mlflow"))
    assert "MLflow: stage 1 not logged (ConnectionError" in caplog.text
    assert _made(mlflow) == ["frozen seed 1", "finetune seed 1"]
    assert _stage_metrics(mlflow, "finetune seed 1") == set()
    mlflow.fail_in = None
    mlflow.calls.clear()
    run_experiment(tiny_config(data, out, **{**over, "seeds": "[0, 1]"}, tracking="mlflow"))
    assert _made(mlflow) == []
    assert {("auc", 1), ("auc", 2)} <= _stage_metrics(mlflow, "finetune seed 1")
    assert _stage_metrics(mlflow, "frozen seed 1") == set()  # logged by the sitting before

    # A run deleted from the store is made anew and given everything.
    next(r for r in mlflow.runs.values() if r["name"] == "frozen seed 0")["deleted"] = True
    mlflow.calls.clear()
    run_experiment(tiny_config(data, out, **over, tracking="mlflow"))
    assert _made(mlflow) == ["frozen seed 0"]
    assert {("auc", 1), ("auc", 2)} <= _stage_metrics(mlflow, "frozen seed 0")


def test_stages_read_back_from_results_json_log_an_undefined_figure_as_nan(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One evaluated row: AUC is undefined, null in results.json. Tracking turned on afterwards logs the
    finished stages from that file, AUC as NaN, instead of failing on the null (and never logging them)."""
    over = {
        **EXAMPLE_TABLE,
        "train.samples_per_stage": 24,
        "train.valid_samples": 1,  # validation's AUC undefined too: null in the epochs' history
        "strategies": "[finetune]",
        "eval.max_samples": 1,
    }
    data, out = HERE / "example_log.csv", tmp_path / "runs"
    run_experiment(tiny_config(data, out, **over))
    with caplog.at_level(logging.WARNING, logger="evolora"):
        run_experiment(tiny_config(data, out, **over, tracking="mlflow"))
    assert "not logged" not in caplog.text, caplog.text
    auc = [c for c in mlflow.calls if c[0] == "metric" and c[1] == ("t", "finetune seed 0") and c[2] == "auc"]
    assert [c[4] for c in auc] == [1, 2] and all(math.isnan(c[3]) for c in auc), auc
    valid = [c for c in mlflow.calls if c[0] == "metric" and c[2] == "stage1.default.valid_auc"]
    assert valid and all(math.isnan(c[3]) for c in valid), [c[2] for c in mlflow.calls if c[0] == "metric"]


def _tracked_finetune_run(tmp_path: Path) -> tuple[Path, pl.DataFrame]:
    """A finished run of finetune, tracked, on the first 80% of the example log; the rest is new.csv.
    Returns the experiment folder and the new rows."""
    new = split_example_log(tmp_path)
    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    cfg = tiny_config(tmp_path / "base.csv", tmp_path / "runs", **over)
    run_experiment(cfg)
    return Path(cfg.output_dir) / cfg.name, new


def test_an_update_logs_its_gate_once_under_the_experiments_run(mlflow: Recorder, tmp_path: Path) -> None:
    root, _ = _tracked_finetune_run(tmp_path)
    mlflow.calls.clear()
    mlflow.fail_in = GATE_RUN  # the store fails after the version is recorded
    update_run(root, tmp_path / "new.csv")
    assert not [c for c in mlflow.calls if c[0] in ("metric", "params", "tags")]  # a batch fails whole
    assert ("made", GATE_RUN) in mlflow.calls
    mlflow.fail_in = None
    mlflow.calls.clear()
    outcome = update_run(root, tmp_path / "new.csv")  # the same command again
    assert outcome.already_applied
    # the gate's run made before is logged into, not made a second time (a failed twin stayed in MLflow)
    started = [c for c in mlflow.calls if c[0] in ("made", "resumed")]
    assert started == [("resumed", "t"), ("resumed", GATE_RUN)]
    assert [r["name"] for r in mlflow.runs.values()].count(GATE_RUN) == 1
    gate = {c[2] for c in mlflow.calls if c[0] == "metric" and c[1] == ("t", GATE_RUN)}
    assert gate == {"gate.candidate", "gate.promoted", "gate.gain", "gate.min_gain"}
    mlflow.calls.clear()
    update_run(root, tmp_path / "new.csv")
    assert not [c for c in mlflow.calls if c[0] in ("made", "metric")]


def test_an_update_logs_where_it_is_told_or_not_at_all(
    mlflow: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, new_rows = _tracked_finetune_run(tmp_path)
    update = ["update", str(root), "--data", str(tmp_path / "new.csv")]
    mlflow.calls.clear()
    elsewhere = f"sqlite:///{tmp_path / 'team.db'}"
    result = CliRunner().invoke(
        app, [*update, "--set", f"tracking_uri={elsewhere}", "--set", "update.min_gain=-1"]
    )
    assert result.exit_code == 0, result.output
    assert ("uri", elsewhere) in mlflow.calls and ("made", GATE_RUN) in mlflow.calls

    monkeypatch.setitem(sys.modules, "mlflow", None)  # a serving machine without MLflow
    new = tmp_path / "newer.csv"
    new_rows.with_columns(pl.col("ts").str.replace("2024", "2025")).write_csv(new)  # later, not future
    update[3] = str(new)
    result = CliRunner().invoke(app, update)
    assert result.exit_code != 0 and "pip install 'evolora[mlflow]'" in result.output
    result = CliRunner().invoke(app, [*update, "--set", "tracking=none"])
    assert result.exit_code == 0 and "version 2" in result.output, result.output


def test_an_update_whose_store_cannot_be_opened_stops_before_training(
    mlflow: Recorder, tmp_path: Path
) -> None:
    """It trained, recorded and promoted the version, then failed on the store: scripts read a failure."""
    root, _ = _tracked_finetune_run(tmp_path)
    args = ["update", str(root), "--data", str(tmp_path / "new.csv"), "--set", "tracking_uri=foo://bar"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "cannot use MLflow at foo://bar" in result.output, result.output
    assert not (root / "deploy" / "finetune-seed0" / "versions.json").exists()
    assert not list(root.glob("deploy/*/work/*"))


def test_next_item_figures_are_logged_under_names_mlflow_takes(mlflow: Recorder, tmp_path: Path) -> None:
    """MLflow refuses `@` in a name: `hit@10` is logged as `hit_at_10` (every stage failed to log before)."""
    from tests.helpers import write_peso_cycle

    over = {
        "task.name": "next_item", "task.history_len": 8, "task.template": "peso",
        "protocol": "leave_last_out", "train.epochs": 1, "train.samples_per_stage": 24,
        "eval.max_samples": 8, "strategies": "[finetune]", "tracking": "mlflow",
    }  # fmt: skip
    cfg = tiny_config(write_peso_cycle(tmp_path / "cycle"), tmp_path / "runs", **over)
    run_experiment(cfg)
    logged = {(c[2], c[4]) for c in mlflow.calls if c[0] == "metric" and c[1] == ("t", "finetune seed 0")}
    assert {("hit_at_10", 1), ("ndcg_at_5", 3), ("nll", 2)} <= logged
    assert ("artifacts", ("t", "finetune seed 0"), "stage-3/adapters") in mlflow.calls


def test_a_stage_whose_upload_failed_logs_its_figures_once(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path
) -> None:
    """The adapters' upload broke off after the stage's figures were logged: the next run uploads them,
    and does not log the figures a second time."""
    cfg = tiny_config(sunny_dir, tmp_path, strategies="[finetune]", tracking="mlflow", **{"train.epochs": 1})
    mlflow.fail_artifacts = 1
    run_experiment(cfg)
    run_experiment(cfg)
    run = ("t", "finetune seed 0")
    auc = [c[4] for c in mlflow.calls if c[0] == "metric" and c[1] == run and c[2] == "auc"]
    assert sorted(auc) == [1, 2]  # each stage once
    uploads = [c[2] for c in mlflow.calls if c[0] == "artifacts" and c[1] == run]
    assert sorted(uploads) == ["stage-1/adapters", "stage-2/adapters"]


def test_names_mlflow_refuses_are_put_in_its_form() -> None:
    assert metric_name("hit@10") == "hit_at_10"
    assert metric_name("recall:10") == "recall_10"  # MLflow 2.10, the extra's floor, refuses ':'
    assert metric_name("data_files.files.ratings (2024).csv") == "data_files.files.ratings _2024_.csv"
    long = metric_name("data_files.files." + "/very/deep" * 40 + "/log.csv")
    assert len(long) == 250 and long != metric_name("data_files.files." + "/very/deep" * 41 + "/log.csv")


def test_a_data_file_whose_name_mlflow_refuses_does_not_stop_the_run_or_its_parameters(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The data files' names are parameter keys: "ratings (2024).csv" stopped the run with a traceback,
    and the rerun, continuing the run made, never logged its parameters."""
    data = tmp_path / "ratings (2024).csv"
    data.write_bytes((HERE / "example_log.csv").read_bytes())
    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    with caplog.at_level(logging.WARNING, logger="evolora"):
        run_experiment(tiny_config(data, tmp_path / "runs", **over))
    assert "not logged" not in caplog.text, caplog.text
    params = [c[2] for c in mlflow.calls if c[0] == "params" and c[1] == ("t", "finetune seed 0")]
    assert len(params) == 1 and "data_files.files.ratings _2024_.csv" in params[0]


def test_parameters_that_could_not_be_logged_are_logged_by_the_next_command(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    cfg = tiny_config(HERE / "example_log.csv", tmp_path / "runs", **over)
    mlflow.fail_params = 2  # the experiment's and the pair's
    with caplog.at_level(logging.WARNING, logger="evolora"):
        run_experiment(cfg)
    assert "MLflow: the parameters not logged (ConnectionError" in caplog.text
    assert not [c for c in mlflow.calls if c[0] == "params"]
    assert {("auc", 1), ("auc", 2)} <= _stage_metrics(mlflow, "finetune seed 0")  # the rest was logged
    mlflow.calls.clear()
    run_experiment(cfg)
    assert _made(mlflow) == []
    assert [c[1] for c in mlflow.calls if c[0] == "params"] == [("t",), ("t", "finetune seed 0")]
    mlflow.calls.clear()
    run_experiment(cfg)
    assert not [c for c in mlflow.calls if c[0] in ("params", "metric")]


def test_a_store_that_fails_during_the_experiment_leaves_its_training_going(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting a pair's run failed with a traceback that stopped the experiment. Now: a warning, nothing
    more logged in that sitting (each call would wait through MLflow's retries), every pair trained, and
    the next command logs what is missing, once."""
    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[frozen, finetune]"}
    over["tracking"] = "mlflow"
    cfg = tiny_config(HERE / "example_log.csv", tmp_path / "runs", **over)
    mlflow.fail_start = {"frozen seed 0"}
    with caplog.at_level(logging.WARNING, logger="evolora"):
        results = run_experiment(cfg)
    assert "MLflow: starting the run of frozen seed 0 failed (ConnectionError" in caplog.text
    assert [len(r["stages"]) for r in results] == [2, 2]
    assert _made(mlflow) == ["t"] and not [c for c in mlflow.calls if c[0] == "metric"]
    assert mlflow.runs["id0"]["status"] == "FINISHED"
    mlflow.fail_start = set()
    mlflow.calls.clear()
    run_experiment(cfg)
    assert _made(mlflow) == ["frozen seed 0", "finetune seed 0"]
    logged = [(c[1], c[2], c[4]) for c in mlflow.calls if c[0] == "metric"]
    assert len(logged) == len(set(logged)) and ("t", "finetune seed 0") in {c[0] for c in logged}


def test_a_store_that_cannot_say_whether_a_run_exists_gets_no_second_tree(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any failure to look a run up was taken for its absence: a transient error on a rerun made a whole
    second tree of runs and logged everything again."""
    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    cfg = tiny_config(HERE / "example_log.csv", tmp_path / "runs", **over)
    run_experiment(cfg)
    mlflow.calls.clear()
    mlflow.fail_lookup = {"t"}
    with pytest.raises(ConfigError, match=r"cannot use MLflow at .*read timed out"):
        run_experiment(cfg)  # the experiment's run: before any work
    mlflow.fail_lookup = {"finetune seed 0"}
    with caplog.at_level(logging.WARNING, logger="evolora"):
        run_experiment(cfg)  # a pair's run: a warning, the work goes on
    assert (
        "MLflow: looking up the run of finetune seed 0 failed (ConnectionError: read timed out)"
        in caplog.text
    )
    assert _made(mlflow) == [] and not [c for c in mlflow.calls if c[0] in ("params", "metric")]


def test_a_store_mlflow_cannot_open_stops_a_run_before_any_work(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path
) -> None:
    """It was opened only once the data and the model were prepared and the bundle written."""
    cfg = tiny_config(sunny_dir, tmp_path / "out", tracking="mlflow", tracking_uri="foo:bar")
    with pytest.raises(ConfigError, match="cannot use MLflow at foo:bar: ValueError: no store for foo:bar"):
        run_experiment(cfg)
    assert not (tmp_path / "out" / cfg.name).exists()


def test_a_moved_store_logs_no_adapters_into_the_old_folders_artifacts(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MLflow keeps the artifact place an experiment was made with: a runs folder moved with its mlflow.db
    logged the next stages' adapters into the old folder's mlartifacts (made again there, or into the copy's
    original). They are left out, said once; figures are still logged."""
    from tests.helpers import Killed, kill_after_stage

    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    with pytest.raises(Killed):
        run_experiment(
            tiny_config(HERE / "example_log.csv", tmp_path / "runs", **over), on_stage=kill_after_stage
        )
    assert [c for c in mlflow.calls if c[0] == "artifacts"]  # stage 1's, where the store was made
    (tmp_path / "runs").rename(tmp_path / "moved")
    mlflow.calls = [c for c in mlflow.calls if c[0] == "created"]  # the store's experiment, as it was made
    with caplog.at_level(logging.WARNING, logger="evolora"):
        run_experiment(tiny_config(HERE / "example_log.csv", tmp_path / "moved", **over))
    assert not [c for c in mlflow.calls if c[0] == "artifacts"]
    assert [c for c in mlflow.calls if c[0] == "metric" and c[2].startswith("stage2")], mlflow.calls
    assert caplog.text.count("its experiment keeps its artifacts at file://") == 1
    assert not (tmp_path / "runs").exists()


def test_a_runs_folder_moved_with_its_store_continues_its_mlflow_runs(
    mlflow: Recorder, tmp_path: Path
) -> None:
    """tracking.json keyed the store next to the runs by its absolute path: a runs folder moved or copied
    (with its mlflow.db) made a second tree of runs and logged everything again. A tracking.json written by
    an older evolora (keyed so) is still read where the folder did not move."""
    import json

    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    run_experiment(tiny_config(HERE / "example_log.csv", tmp_path / "runs", **over))
    (tmp_path / "runs").rename(tmp_path / "moved")
    mlflow.calls.clear()
    run_experiment(tiny_config(HERE / "example_log.csv", tmp_path / "moved", **over))
    assert _made(mlflow) == [] and not [c for c in mlflow.calls if c[0] in ("params", "metric")]

    state = tmp_path / "moved" / "t" / "tracking.json"
    kept = json.loads(state.read_text())
    legacy = f"sqlite:///{(tmp_path / 'moved').resolve() / 'mlflow.db'}"
    state.write_text(json.dumps({legacy: kept["output_dir/mlflow.db"]}))
    mlflow.calls.clear()
    run_experiment(tiny_config(HERE / "example_log.csv", tmp_path / "moved", **over))
    assert _made(mlflow) == []


def test_a_long_parameter_is_logged_whole_up_to_mlflows_limit(
    mlflow: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Parameters were cut to 500 characters without a word (MLflow takes 6000 since 2.8): a deep data
    path lost its file name, a comparison's strategies list its second half."""
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200)
    deep.mkdir(parents=True)
    (deep / "log.csv").write_bytes((HERE / "example_log.csv").read_bytes())
    over = {**EXAMPLE_TABLE, "train.samples_per_stage": 24, "strategies": "[finetune]", "tracking": "mlflow"}
    run_experiment(tiny_config(deep / "log.csv", tmp_path / "runs", **over))
    params = next(c[2] for c in mlflow.calls if c[0] == "params" and c[1] == ("t",))
    assert params["data.source"] == str(deep / "log.csv")
    with caplog.at_level(logging.WARNING, logger="evolora"):
        kept = tracking._param_value("strategies", "x" * (tracking.PARAM_LIMIT + 5))
    assert kept == "x" * tracking.PARAM_LIMIT
    assert f"parameter strategies is {tracking.PARAM_LIMIT + 5} characters" in caplog.text


def test_a_password_in_the_store_address_is_shown_as_stars(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path, server: str
) -> None:
    """It was printed in errors, logged as the tracking_uri parameter and kept in tracking.json."""
    uri = server.replace("http://", "http://ann:s3cret@")
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow", tracking_uri=uri)
    _open_experiment(cfg, tmp_path)
    assert ("uri", uri) in mlflow.calls  # MLflow itself gets the password
    params = next(c[2] for c in mlflow.calls if c[0] == "params")
    assert params["tracking_uri"] == server.replace("http://", "http://ann:***@")
    assert "s3cret" not in (tmp_path / cfg.name / "tracking.json").read_text()
    with socket.create_server(("127.0.0.1", 0)) as listening:
        closed = f"http://ann:s3cret@127.0.0.1:{listening.getsockname()[1]}"
    with pytest.raises(ConfigError, match=r"answers at http://ann:\*\*\*@127") as refused:
        check_tracking(tiny_config(sunny_dir, tmp_path, tracking="mlflow", tracking_uri=closed))
    assert "s3cret" not in str(refused.value)


def test_a_password_is_kept_out_of_warnings_and_an_older_tracking_json(
    mlflow: Recorder, sunny_dir: Path, tmp_path: Path, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Review: MLflow's errors quote the store's address (its REST client names the URL), and the warnings
    of a failure later printed them whole; a tracking.json of before kept the key with the password until
    a later change; a malformed address raised from the masking itself."""
    uri = server.replace("http://", "http://ann:s3cret@")
    cfg = tiny_config(sunny_dir, tmp_path, tracking="mlflow", tracking_uri=uri)
    (tmp_path / cfg.name).mkdir()
    (tmp_path / cfg.name / "tracking.json").write_text(json.dumps({uri: {"runs": {}, "gates": {}}}))
    tracker = MlflowTracker(cfg, tmp_path / cfg.name)
    assert "s3cret" not in (tmp_path / cfg.name / "tracking.json").read_text()

    def refuses(*args: object, **kwargs: object) -> None:
        raise ConnectionError(f"API request to {uri}/api/2.0/mlflow/runs/log-batch failed")

    with caplog.at_level(logging.WARNING, logger="evolora"):
        assert not tracker._logged("the parameters", "later", refuses)
    assert "API request to http://ann:***@127" in caplog.text and "s3cret" not in caplog.text
    assert shown_uri("http://[oops/x") == "http://[oops/x"  # (urlsplit raised ValueError on it)
    check_tracking(tiny_config(sunny_dir, tmp_path, tracking_uri="http://[oops/x"))  # a warning, no error


def test_a_store_given_without_tracking_on_is_said_to_be_unused(
    sunny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(sunny_dir, tmp_path, tracking_uri="sqlite:///mine.db")
    with caplog.at_level(logging.WARNING, logger="evolora"):
        check_tracking(cfg)
    assert "tracking_uri sqlite:///mine.db is not used with tracking: none: nothing is logged" in caplog.text
