"""`accelerate launch -m evolora run`: two CPU processes (gloo) give one process's parameters and metrics.

One launch covers a strategy of each family: plain LoRA (finetune), PESO (anchor + KL), a cumulative one
(SumLoRA), InfLoRA (input statistics reduced across processes) and RecLoRA (CRM, banks, gates, router),
and `frozen` beside them; once with DDP and once with FSDP (the decoder layers' weights sharded between the
two processes). Every stage is tested after every stage (`eval.stages: all`), so the matrix's entries,
their rows split and gathered and the unchanged ones reused, are checked in the same launches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evolora.config import config_to_dict
from evolora.experiment import run_experiment
from tests.helpers import free_port, tiny_config

ACCELERATE = Path(__file__).parent.parent / "configs" / "accelerate"
CRM = "{dim: 8, mlp: [16], max_len: 10, dropout: 0.0}"
RECLORA = f"{{name: reclora, n_meta: 3, crm: {CRM}, crm_epochs: 1, gate_dropout: 0.0}}"
OVER = {
    "threads": 1,
    "model.lora.dropout": 0.0,  # dropout masks are drawn per process (parallel.py)
    "task.history_len": 4,
    "task.retrieve_from": 8,
    "task.sample_history": 10,
    "train.samples_per_stage": 17,  # batches of 8, 8, 1: the last one's shares are 1 and 0 rows
    "train.grad_accum": 2,
    "eval.batch_size": 10,
    "eval.stages": "all",
    # InfLoRA's statistics: 64 rows in 7 passes of 10, 4 + 3 per process
    "strategies": f"[frozen, finetune, peso, sumlora, {{name: inflora, stats_batch: 10}}, {RECLORA}]",
}


def _tensors(run: Path, stage: int) -> dict[str, torch.Tensor]:
    """Every adapter and strategy state a stage's jobs saved."""
    jobs = run / f"stage-{stage}" / "jobs"
    out = {}
    for f in sorted(jobs.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            if v.is_floating_point():
                out[f"{f.relative_to(jobs)}/{k}"] = v
    return out


def _launch(config: Path, env: dict[str, str], engine: str, *more: str) -> subprocess.CompletedProcess:
    file = str(ACCELERATE / f"{engine}.yaml")
    # A port of our own rather than `--main_process_port 0`, which older accelerate (0.34) passes on as port 0
    # (both processes then wait forever in the rendezvous).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", file,
        "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "evolora", "run", str(config),
        *more,
    ]  # fmt: skip
    # torch's launcher leaves a torchelastic_* folder in the temporary folder: in the test's, not in /tmp
    env = {**env, "TMPDIR": str(config.parent)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def one_process(sunny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("one")
    return out, run_experiment(tiny_config(sunny_dir, out, **OVER))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_and_evaluate_as_one(
    engine: str, one_process: tuple[Path, list], sunny_dir: Path, tmp_path: Path
) -> None:
    one_dir, one = one_process
    # FSDP with gradient checkpointing as big backbones run it: the same steps as one process without
    ckpt = {"train.gradient_checkpointing": True} if engine == "fsdp" else {}
    cfg = tiny_config(sunny_dir, tmp_path / "two", **OVER, **ckpt)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONFAULTHANDLER": "1",
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    done = _launch(config, env, engine)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    for res in one:
        method = res["method"]
        two = json.loads((tmp_path / "two" / "t" / method / "seed0" / "results.json").read_text())
        for t, (a, b) in enumerate(zip(res["stages"], two["stages"], strict=True), 1):
            for name, value in a["metrics"].items():
                assert b["metrics"][name] == pytest.approx(value, abs=2e-4), (method, t, name)
            assert a["matrix"].keys() == b["matrix"].keys() == {"1", "2", "3"}, (method, t)
            for j, entry in a["matrix"].items():
                for name, value in entry.items():
                    assert b["matrix"][j][name] == pytest.approx(value, abs=2e-4), (method, t, j, name)
            assert b["matrix_reused"] == a["matrix_reused"], (method, t)
        for stage in (1, 2, 3):
            x = _tensors(one_dir / "t" / method / "seed0", stage)
            y = _tensors(tmp_path / "two" / "t" / method / "seed0", stage)
            assert x.keys() == y.keys() and (x or stage == 3 or method == "frozen"), (method, stage)
            for k in x:
                # Two processes sum a batch's gradient in another order than one, and Adam carries that
                # rounding into the weights: ~1e-5 after a few steps, but up to 2.3e-4 (and CPU-dependent) on
                # an element whose gradient is near zero, where dividing by sqrt(v) magnifies the rounding
                # (sumlora's stage 2 has one). So the tensor is compared as a whole: a process whose share
                # went missing moves every element by ~lr per step, 1e-2 and more.
                diff = float((y[k] - x[k]).norm() / x[k].norm().clamp_min(1e-12))
                assert diff < 1e-3, f"{method} stage {stage} {k}: relative difference {diff:.2e}"

    # One writer: the same files as one process, each epoch logged once.
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    cli_only = {"report.md", "report.json", "auc.png", "auc-matrix.png"}  # `evolora run` writes the report
    assert files(tmp_path / "two" / "t") - cli_only == files(one_dir / "t")
    trained_epochs = sum(
        sum(1 for h in job["history"] if h["epoch"] > 0)
        for res in one
        for stage in res["stages"]
        for job in stage["jobs"]
        if not job.get("reused_shared_result")
    )
    log = (tmp_path / "two" / "t" / "log.txt").read_text()
    assert len(re.findall(r"epoch \d+: train_loss", log)) == trained_epochs > 0
    assert "per-stage results" in done.stdout and done.stdout.count("per-stage results") == 1
    # warnings too are the main process's: every process prepares the same data
    assert (done.stdout + done.stderr).count("asks for more samples than the valid pool holds") == 1
    # The cost records add up both processes' work: under DDP each read its share of every batch and of the
    # evaluated rows, so the tokens are one process's (FSDP evaluates every row in both processes).
    for res in one:
        two = json.loads((tmp_path / "two" / "t" / res["method"] / "seed0" / "results.json").read_text())
        assert two["setup_cost"]["processes"] == 2
        for a, b in zip(res["stages"], two["stages"], strict=True):
            assert b["cost"]["processes"] == 2 and "processes" not in a["cost"]
            if engine == "ddp":
                tokens = {k: (p["tokens"], p["backward_tokens"]) for k, p in a["cost"]["parts"].items()}
                assert {k: (p["tokens"], p["backward_tokens"]) for k, p in b["cost"]["parts"].items()
                        if p["tokens"]} == {k: v for k, v in tokens.items() if v[0]}  # fmt: skip
    held = re.findall(r"FSDP: this process holds ([\d.]+)% of the decoder layers' weights", log)
    if engine == "fsdp":  # one process's share: half the frozen weights, and the LoRA factors whole
        assert len(held) == 1 and 50 < float(held[0]) < 60, held
    else:
        assert not held


def test_a_mistake_under_a_launch_is_said_once(sunny_dir: Path, tmp_path: Path) -> None:
    """Every process finds the same mistake; the launcher stops the others once the main one has said it."""
    cfg = tiny_config(sunny_dir, tmp_path / "out")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = _launch(config, env, "ddp", "--jobs", "2")
    said = done.stdout + done.stderr
    assert done.returncode != 0 and said.count("error: --jobs 2 inside a 2-process launch") == 1, said[-3000:]


def test_deepspeed_and_fsdp_options_not_built_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from evolora import parallel
    from evolora.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"DeepSpeed.*fsdp\.yaml"):
        parallel.start("cpu")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert parallel.fsdp_settings() == {"reshard_after_forward": True}  # FULL_SHARD by default
    keep, free = {"reshard_after_forward": False}, {"reshard_after_forward": True}
    for value, plan in [("false", keep), ("SHARD_GRAD_OP", keep), ("NO_SHARD", None), ("true", free)]:
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", value)
        assert parallel.fsdp_settings() == plan, value
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match="hybrid"):
        parallel.fsdp_settings()
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    refused = [("FSDP_OFFLOAD_PARAMS", "offload"), ("FSDP_ACTIVATION_CHECKPOINTING", "checkpointing")]
    for name, match in refused:
        monkeypatch.setenv(name, "true")
        with pytest.raises(ConfigError, match=match):
            parallel.fsdp_settings()
        monkeypatch.setenv(name, "false")


def test_a_cpu_launch_of_one_process_for_several_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`accelerate launch --cpu --num_processes 2` runs accelerate's simple launcher: one process, which ran
    as a plain run without a word (README advised that form)."""
    from evolora import parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(parallel._state, "told_simple", False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")  # set by the simple launcher for --num_processes > 1 only
    with caplog.at_level("WARNING", logger="evolora"):
        parallel.start("cpu")
        parallel.start("cpu")  # the command and the experiment: said once
    assert caplog.text.count("accelerate launch --cpu started one process, whatever --num_processes") == 1
    caplog.clear()
    monkeypatch.setitem(parallel._state, "told_simple", False)
    monkeypatch.delenv("MASTER_PORT")  # --num_processes 1: nothing to say
    parallel.start("cpu")
    assert "started one process" not in caplog.text


@pytest.mark.parametrize(
    ("over", "match"),
    [({"model.name": "mf"}, "conventional model mf"), ({"model.quantization": "nf4"}, "quantization")],
)
def test_fsdp_refuses_what_it_cannot_shard(over: dict, match: str, tmp_path: Path) -> None:
    from evolora.errors import ConfigError
    from evolora.experiment import _check_shardable

    cfg = tiny_config(tmp_path, tmp_path / "out")
    ((name, value),) = over.items()
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={name.split(".")[1]: value})})
    with pytest.raises(ConfigError, match=match):
        _check_shardable(cfg)


def test_other_commands_refuse_a_launch(sunny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from evolora.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["data", "info", str(sunny_dir)])
    assert result.exit_code == 2 and "`evolora data info` runs in one process" in result.output
    result = CliRunner().invoke(app, ["export-user-adapter", str(sunny_dir), "u1"])
    assert result.exit_code == 2 and "`evolora export-user-adapter` runs in one process" in result.output


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_under_a_launch_is_said_once(
    rank: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from evolora import config
    from evolora.cli import app

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)  # Ctrl-C reaches every process of the launch
    monkeypatch.setattr(config, "load_config", interrupted)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 130 and result.output.count("interrupted") == (rank == "0")
