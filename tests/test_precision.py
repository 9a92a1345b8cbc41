"""Precision: what `auto` picks, the bf16-mixed lane, and computations that must stay in full precision.

The rest of the suite pins `precision: fp32` so its numbers do not depend on the CPU. The tests marked
`bf16` run every strategy in bf16-mixed (native where the CPU has bf16, emulated elsewhere: slower, same
code) and check that each runs and learns.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from evolora.errors import EvoloraError
from evolora.experiment import run_experiment
from evolora.models import precision as precision_mod
from tests.helpers import LORA_STRATEGIES, tiny_config

LEARN = {"train.lr": 0.03, "train.schedule": "constant", "train.epochs": 3, "train.samples_per_stage": 96}


@pytest.mark.parametrize(("flag", "expected"), [("1", "bf16-mixed"), ("0", "fp32")])
def test_the_cpu_detection_can_be_forced(monkeypatch: pytest.MonkeyPatch, flag: str, expected: str) -> None:
    monkeypatch.setenv(precision_mod.CPU_BF16_ENV, flag)
    dtype, mixed = precision_mod.resolve_precision("auto", torch.device("cpu"))
    assert dtype == torch.float32 and ("bf16-mixed" if mixed else "fp32") == expected
    monkeypatch.setenv(precision_mod.CPU_BF16_ENV, "yes")
    with pytest.raises(EvoloraError, match="EVOLORA_CPU_BF16"):
        precision_mod.cpu_has_native_bf16()


@pytest.mark.parametrize(
    ("flags", "native", "described"),
    [
        ({"avx2", "fma"}, False, "Some CPU (avx2)"),
        ({"avx2", "avx512f", "avx512_bf16"}, True, "Some CPU (avx2, avx512f, avx512_bf16)"),
    ],
)
def test_one_reading_of_the_cpu_decides_precision_and_names_the_machine(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], native: bool, described: str
) -> None:
    monkeypatch.delenv(precision_mod.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision_mod, "cpu_info", lambda: ("Some CPU", frozenset(flags)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_mod.cpu_has_native_bf16() is native
    assert precision_mod.machine.__wrapped__() == described


def test_without_autocast_restores_full_precision_inside_autocast() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with precision_mod.without_autocast():
            assert (a @ b).dtype == torch.float32
            assert (a.double() @ b.double()).dtype == torch.float64


@pytest.mark.bf16
def test_every_strategy_runs_and_learns_in_bf16_mixed(sunny_dir: Path, tmp_path: Path) -> None:
    strategies = yaml.safe_dump(LORA_STRATEGIES, default_flow_style=True).strip().replace("\n", " ")
    bf16 = {"model.precision": "bf16-mixed"}
    cfg = tiny_config(sunny_dir, tmp_path, **LEARN, strategies=strategies, **bf16)
    results = run_experiment(cfg)
    assert [r["method"] for r in results] == [s.get("label", s["name"]) for s in LORA_STRATEGIES]
    for r in results:
        assert r["complete"] and r["precision"] == "bf16-mixed", r["method"]
        aucs = [s["metrics"]["auc"] for s in r["stages"]]
        assert all(0.0 <= a <= 1.0 for a in aucs), (r["method"], aucs)
        # The title decides the label in this data; untrained, the model is at chance (AUC ~0.5).
        assert aucs[0] > 0.6, (r["method"], aucs)
        for s in r["stages"]:
            for job in s["jobs"]:
                losses = [h["train_loss"] for h in job["history"] if "train_loss" in h]
                assert losses[-1] < losses[0], (r["method"], s["train_stage"], job["job"], losses)


def test_the_output_layer_runs_in_full_precision_under_bf16_mixed() -> None:
    """bf16 logits near 10 are ~0.06 apart: yes/no scores and item rankings would tie."""
    from evolora.models.llm import LoraLM
    from tests.helpers import tiny_model

    lm = LoraLM.from_config(tiny_model(precision="bf16-mixed"))
    hidden = torch.randn(4, lm.base.config.hidden_size) * 30
    head = lm.base.get_output_embeddings().weight
    with lm.autocast():
        both = lm.logits_from_hidden(hidden, token_ids=[3, 4])
        full = lm.logits_from_hidden(hidden)
    assert both.dtype == full.dtype == torch.float32
    torch.testing.assert_close(both, hidden @ head[[3, 4]].T, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(full[:, [3, 4]], both, rtol=1e-6, atol=1e-5)


def test_the_yes_no_logits_are_fp32_under_bf16() -> None:
    """precision: bf16 (what `auto` picks on a GPU): the two rows were multiplied in bf16 and the product
    rounded (0.06-0.125 apart for logits of 10-30), tying P(like) of distinct hidden states."""
    from evolora.models.llm import LoraLM
    from tests.helpers import tiny_model

    lm = LoraLM.from_config(tiny_model(precision="bf16"))
    head = lm.base.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16
    hidden = (torch.randn(200, lm.base.config.hidden_size) * 30).to(torch.bfloat16)
    both = lm.logits_from_hidden(hidden, token_ids=[3, 4])
    exact = hidden.double() @ head[[3, 4]].double().T
    torch.testing.assert_close(both.double(), exact, rtol=1e-5, atol=1e-4)
    assert len(set((both[:, 0] - both[:, 1]).tolist())) == 200


@pytest.mark.parametrize(
    ("load", "now", "threads", "warned"),
    [
        (1.0, 1.0, 2, True),
        (0.1, 0.1, 2, False),
        (1.0, 1.0, 1, False),
        (2.3, 0.0, 2, False),
        (0.1, 1.0, 2, False),
    ],
)
def test_threads_on_busy_cores_are_warned_about(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    load: float,
    now: float,
    threads: int,
    warned: bool,
) -> None:
    # Two torch threads on two cores while another process keeps one busy: each step waits for the slow one.
    # Busy for the last minute only (the command before just ended: a load average of 2.3 after a run) is
    # no reason, nor is a moment's burst.
    monkeypatch.setattr(precision_mod.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(precision_mod, "cores_busy_elsewhere", lambda: now)
    monkeypatch.setattr(precision_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(precision_mod.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(precision_mod.torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="evolora.models"):
        precision_mod.warn_if_cores_busy()
    assert ("set threads: 1 (--set threads=1)" in caplog.text) is warned


def test_cores_busy_elsewhere_counts_other_processes_not_this_one() -> None:
    import subprocess
    import sys
    import threading
    import time

    if not Path("/proc/stat").is_file():
        pytest.skip("reads /proc/stat (Linux)")
    quiet = precision_mod.cores_busy_elsewhere(window=0.5, reuse_for=0)
    assert quiet is not None
    if quiet > len(os.sched_getaffinity(0)) - 1.5:  # no core left for a busy process to show on
        pytest.skip(f"the machine is busy already ({quiet:.1f} cores)")
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()  # this process's own work: not counted
    try:
        own = precision_mod.cores_busy_elsewhere(window=0.5, reuse_for=0)
    finally:
        stop.set()
        spinner.join()
    other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = precision_mod.cores_busy_elsewhere(window=0.5, reuse_for=0)
    finally:
        other.kill()
        other.wait()
    assert own is not None and busy is not None
    assert own < quiet + 0.5  # a core's worth of this process's own spinning was not counted
    assert busy > quiet + 0.5  # another process's core was
