"""Memory options: gradient checkpointing, fp16 with loss scaling, QLoRA (quantization) and their checks.

The CUDA tests (named `test_cuda_*`) run only where a CUDA GPU is (and, for QLoRA, bitsandbytes), with
`EVOLORA_TEST_CUDA=1` (the suite hides the GPU otherwise); `scripts/gpu_check.py` runs them there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evolora.config import CtrTaskConfig, TrainConfig, config_to_dict, load_config
from evolora.errors import ConfigError
from evolora.models import precision as precision_mod
from evolora.models import weights as weights_mod
from evolora.models.llm import LoraLM
from evolora.tasks.ctr import CtrTask
from evolora.train.trainer import train_adapter
from tests.helpers import four_users_table, tiny_model

CUDA = torch.cuda.is_available()
# Checkpointed training runs a shared prompt prefix once per sequence instead of once per batch: the same
# numbers, but LoRA dropout would draw its masks in another layout.
NO_DROPOUT = tiny_model(lora={"dropout": 0.0})
BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def table():
    return four_users_table()


TITLES = {
    f"i{k}": t for k, t in enumerate(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Se7en", "Up"])
}


def ctr_task(table, lm: LoraLM) -> CtrTask:
    # The tallrec template has a shared prefix: checkpointed training must still see it.
    return CtrTask(CtrTaskConfig(), table, TITLES, lm.tokenizer, item_kind="movie")


def train_once(table, lm: LoraLM, **train: object) -> list[torch.Tensor]:
    """One epoch of `train_adapter` from a fixed adapter; the trained LoRA weights."""
    lm.reset_adapter(seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a non-zero update, so every LoRA factor gets a gradient
        for _, _, b in lm.lora_pairs():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    torch.manual_seed(0)  # the same LoRA dropout masks in every call
    lm.activate("default", trainable=True)
    task = ctr_task(table, lm)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, select_by="last", **train)
    rows = np.arange(len(table))
    train_adapter(lm, task, lm.trainable_parameters(), rows, rows[:0], cfg, seed=0)
    lm.activate("default", trainable=False)
    return [t.detach().clone() for _, a, b in lm.lora_pairs() for t in (a, b)]


# ------------------------------------------------------------------ gradient checkpointing


def test_gradient_checkpointing_gives_the_same_gradients(table) -> None:
    lm = LoraLM.from_config(NO_DROPOUT)
    task = ctr_task(table, lm)
    assert task.prefix, "the check needs a shared prompt prefix"
    with torch.no_grad():
        for _, _, b in lm.lora_pairs():
            b.normal_(0, 0.05)
    lm.activate("default", trainable=True)
    lm.model.train()
    rows = np.arange(6)
    grads = []
    for checkpointing in (False, True):
        lm.model.zero_grad()
        with lm.gradient_checkpointing(checkpointing):
            if checkpointing:
                assert lm.base.get_decoder().layers[0].gradient_checkpointing
            task.loss(lm, rows).backward()
        grads.append([p.grad.clone() for p in lm.trainable_parameters()])
    assert not lm.base.get_decoder().layers[0].gradient_checkpointing  # switched off after the block
    assert all(g.abs().sum() > 0 for g in grads[0])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_training_with_gradient_checkpointing_ends_at_the_same_adapter(table) -> None:
    lm = LoraLM.from_config(NO_DROPOUT)
    plain = train_once(table, lm)
    checkpointed = train_once(table, lm, gradient_checkpointing=True)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert not lm.checkpointing


def test_new_keys_stay_out_of_the_experiment_key_at_their_defaults() -> None:
    dumped = config_to_dict(load_config(None))
    assert "quantization" not in dumped["model"] and "gradient_checkpointing" not in dumped["train"]
    on = config_to_dict(load_config(None, ["train.gradient_checkpointing=true"]))
    assert on["train"]["gradient_checkpointing"] is True


# ------------------------------------------------------------------ fp16 and loss scaling


def machine_check(overrides: list[str]) -> None:
    """What a run (or an update) checks before any work, for a config with these overrides."""
    m = load_config(None, overrides).model
    precision_mod.check_machine(m.precision, m.quantization, m.device)


def test_fp16_is_refused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(None, ["model.precision=fp16"]).model.precision == "fp16"  # loads anywhere
    with pytest.raises(ConfigError, match=r"model.precision=fp16 .* no CUDA GPU"):
        machine_check(["model.precision=fp16"])
    with pytest.raises(ConfigError, match=r"model.precision=fp16"):
        precision_mod.resolve_precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"model.device is cpu"):
        machine_check(["model.precision=fp16", "model.device=cpu"])
    machine_check(["model.precision=fp16"])  # a CUDA machine


def test_loss_scaling_leaves_the_trained_adapter_unchanged(table, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's GradScaler path (what fp16 uses) on fp32: scaling by a power of two and back is exact."""
    lm = LoraLM.from_config(tiny_model())
    plain = train_once(table, lm)
    monkeypatch.setattr(LoraLM, "loss_scaling", property(lambda self: True))
    scaled_steps = []
    real_step = torch.amp.GradScaler.step
    monkeypatch.setattr(
        torch.amp.GradScaler,
        "step",
        lambda self, opt: scaled_steps.append(self.get_scale()) or real_step(self, opt),
    )
    scaled = train_once(table, lm)
    assert scaled_steps and scaled_steps[0] > 1  # the loss really was scaled
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ quantization (QLoRA)


def test_quantization_needs_cuda_and_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model.quantization=nf4 \(QLoRA.*no CUDA GPU"):
        machine_check(["model.quantization=nf4"])
    with pytest.raises(ConfigError, match=r"model.quantization=int8"):
        weights_mod.load_pretrained("tiny", torch.float32, quantization="int8")  # the model-build check
    with pytest.raises(ConfigError, match="applies to LLM backbones"):
        load_config(None, ["model.quantization=nf4", "model.name=mf"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision_mod, "bitsandbytes_installed", lambda: False)
    # the extra pyproject declares (tests/test_shipped_configs.py checks it is there)
    with pytest.raises(
        ConfigError, match=r"bitsandbytes package is not installed \(pip install 'evolora\[qlora\]'\)"
    ):
        machine_check(["model.quantization=int8"])
    with pytest.raises(ConfigError, match=r"model.device is cpu"):
        machine_check(["model.quantization=nf4", "model.device=cpu"])


def test_a_run_that_cannot_run_here_stops_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from evolora.experiment import run_experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["model.name=tiny", "model.quantization=nf4", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.quantization=nf4"):
        run_experiment(cfg)
    assert not any(tmp_path.iterdir())  # nothing written, nothing downloaded


def test_quantization_error_on_this_machine() -> None:
    """Whatever this machine lacks, the message says what QLoRA needs (a no-op where it can run)."""
    if CUDA and BITSANDBYTES:
        pytest.skip("this machine can run QLoRA")
    with pytest.raises(ConfigError, match="needs a CUDA GPU and the bitsandbytes package"):
        machine_check(["model.quantization=nf4"])


# ------------------------------------------------------------------ on a CUDA GPU


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_fp16_trains_with_loss_scaling(table) -> None:
    lm = LoraLM.from_config(tiny_model(precision="fp16", device="cuda"), new_tokens=["<a_0>", "<a_1>"])
    assert lm.precision == "fp16" and lm.loss_scaling
    # Loss scaling unscales fp32 gradients only: the added tokens' rows train in fp32 like the LoRA factors.
    assert all(m.trainable_tokens_delta["default"].dtype == torch.float32 for m in lm.token_layers())
    assert lm.base.get_decoder().layers[0].mlp.up_proj.weight.dtype == torch.float16
    before = [t.clone() for t in train_once(table, lm)]
    assert all(torch.isfinite(t).all() for t in before)
    assert all(a.dtype == torch.float32 for _, a, _ in lm.lora_pairs())
    scores = ctr_task(table, lm).predict(lm, np.arange(len(table)), 8)
    assert np.isfinite(scores).all()


@pytest.mark.skipif(not (CUDA and BITSANDBYTES), reason="needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_cuda_qlora_trains_and_scores(table, quantization: str) -> None:
    lm = LoraLM.from_config(
        tiny_model(name="tiny", precision="bf16", device="cuda", quantization=quantization)
    )
    assert lm.quantized
    trained = train_once(table, lm, gradient_checkpointing=True)
    assert all(torch.isfinite(t).all() for t in trained)
    scores = ctr_task(table, lm).predict(lm, np.arange(len(table)), 8)
    assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()


# ------------------------------------------------------------------ scripts/gpu_check.py

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_gpu_says_so_and_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU available" in proc.stdout
    assert not out.exists()


def test_gpu_check_records_every_failed_step_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path run blind, with every command failing: each step is recorded, none stops the check."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    commands, envs = [], []

    def failing(cmd, **kw):
        commands.append(cmd)
        envs.append(kw.get("env") or {})
        return subprocess.CompletedProcess(cmd, 2, "", "boom")

    monkeypatch.setattr(gpu_check.subprocess, "run", failing)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"device": "fake"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "gpu_check.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(out)])
    assert gpu_check.main() == 1
    record = json.loads(out.read_text())
    assert record["environment"] == {"device": "fake"} and record["passed"] is False
    steps = record["steps"]
    names = [
        "cuda_marked_tests",
        "cuda_tests",
        "quickstart",
        "profile_train_step",
        "bench_ctr",
        "bench_next_item",
    ]
    assert list(steps) == names
    assert all(s["status"] == "failed" for s in steps.values())
    assert steps["quickstart"]["auc_per_stage"] == {} and steps["bench_ctr"]["stderr"] == "boom"
    quickstart = next(c for c in commands if "run" in c and "configs/quickstart.yaml" in c)
    assert "train.samples_per_stage=[1024,128]" in quickstart and "name=gpu-quickstart" in quickstart
    # The suite hides a GPU unless told (tests/conftest.py): the CUDA tests' command is told.
    cuda_tests = next(i for i, c in enumerate(commands) if "pytest" in c and "cuda_" in c)
    assert envs[cuda_tests].get("EVOLORA_TEST_CUDA") == "1" and envs[0].get("EVOLORA_TEST_CUDA") is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_training_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does(
    table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the LoRA dropout masks come from the GPU's generator: a checkpoint that kept only the CPU's
    state resumed epoch 2 with epoch 1's masks."""
    lm = LoraLM.from_config(tiny_model(precision="fp32", device="cuda"))
    rows = np.arange(len(table))
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01, select_by="last")

    def train(checkpoint: Path | None) -> list[torch.Tensor]:
        lm.reset_adapter(seed=1)
        torch.manual_seed(0)
        lm.activate("default", trainable=True)
        params = lm.trainable_parameters()
        train_adapter(lm, ctr_task(table, lm), params, rows, rows[:0], cfg, seed=0, checkpoint=checkpoint)
        return [p.detach().clone() for p in params]

    whole = train(None)
    real_loss, calls = CtrTask.loss, {"n": 0}

    def dying(self, lm, batch_rows):
        calls["n"] += 1
        if calls["n"] > -(-len(rows) // 4):  # the first batch of epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return real_loss(self, lm, batch_rows)

    monkeypatch.setattr(CtrTask, "loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "job.safetensors")
    monkeypatch.setattr(CtrTask, "loss", real_loss)
    resumed = train(tmp_path / "job.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))


def test_accumulated_micro_batches_take_the_larger_batchs_step(table) -> None:
    """Two accumulated batches of 4 are one step over the rows a batch of 8 takes (length grouping drew
    them apart: other rows per step, 3.6e-3 apart after four steps in an audit)."""
    lm = LoraLM.from_config(NO_DROPOUT)
    rows = np.arange(len(table))

    def train(batch_size: int, grad_accum: int) -> list[torch.Tensor]:
        lm.reset_adapter(seed=1)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for _, _, b in lm.lora_pairs():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
        lm.activate("default", trainable=True)
        cfg = TrainConfig(epochs=2, batch_size=batch_size, grad_accum=grad_accum, lr=0.01, select_by="last")
        train_adapter(lm, ctr_task(table, lm), lm.trainable_parameters(), rows, rows[:0], cfg, seed=0)
        lm.activate("default", trainable=False)
        return [t.detach().clone() for _, a, b in lm.lora_pairs() for t in (a, b)]

    assert len(rows) > 8  # more than one step an epoch
    for one, accumulated in zip(train(8, 1), train(4, 2), strict=True):
        torch.testing.assert_close(one, accumulated, rtol=1e-4, atol=1e-6)
