"""`keep_freed_memory`: freed large tensors are reused instead of faulting in fresh pages; opt-out; wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evolora.experiment
from evolora.experiment import run_experiment
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent

# Makes, writes and frees a 48 MB tensor (above glibc's 32 MiB cap on its own mmap threshold, so by default
# every one is a fresh mapping) ten times to settle, then ten times more, counting the minor page faults
# those took. (Tuned, the heap grows during the first few: small objects made between two tensors split
# the freed space until neighbouring holes merge.)
PROBE = """
import json, resource, torch
from evolora.allocator import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def make_and_free():
    x = torch.empty(12_000_000)
    x.fill_(1.0)
    del x
for _ in range(10):
    make_and_free()
before = faults()
for _ in range(10):
    make_and_free()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, "EVOLORA_KEEP_FREED_MEMORY": setting}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not _glibc(), reason="the thresholds are glibc's")
def test_freed_large_tensors_are_reused_not_faulted_in_again() -> None:
    default, tuned = _probe("0"), _probe("1")
    assert not default["applied"] and tuned["applied"]
    # 10 x 48 MB: by default each is new pages (12k faults each at 4 KiB pages); tuned, reused memory.
    assert tuned["faults"] * 4 < default["faults"], (default, tuned)


def test_runs_tune_the_allocator(sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(evolora.experiment, "keep_freed_memory", lambda: calls.append(1) or True)
    run_experiment(tiny_config(sunny_dir, tmp_path, **{"seeds": "[0]", "strategies": "[frozen]"}))
    assert calls
