"""`keep_freed_memory`: freed large tensors are reused instead of faulting in fresh pages; opt-out; wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evolora.allocator
import evolora.experiment
from evolora.allocator import is_glibc
from evolora.experiment import run_experiment
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent

# Makes, writes and frees a 48 MB tensor (above glibc's 32 MiB cap on its own mmap threshold, so by default
# every one is a fresh mapping) twenty times to settle, then ten times more, counting the minor page faults of
# each of those. Tuned, the heap may still grow during the first few: a small object made beside a freed
# block splits its space until neighbouring holes merge; how long that takes varies with what else the
# process allocates, so the test asks for most iterations to be free of faults, not all.
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
for _ in range(20):
    make_and_free()
per_iteration = []
for _ in range(10):
    before = faults()
    make_and_free()
    per_iteration.append(faults() - before)
print(json.dumps({"applied": applied, "faults": per_iteration}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, "EVOLORA_KEEP_FREED_MEMORY": setting}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not is_glibc(), reason="the thresholds are glibc's")
def test_freed_large_tensors_are_reused_not_faulted_in_again() -> None:
    default, tuned = _probe("0"), _probe("1")
    assert not default["applied"] and tuned["applied"]
    # By default each 48 MB tensor is new pages (about 12k faults at 4 KiB pages, 24 with 2 MiB huge pages);
    # tuned, most of them reuse the memory of the one before, without a fault.
    assert min(default["faults"]) >= 10, default
    assert sum(f < 10 for f in tuned["faults"]) >= 6, tuned


def test_the_run_command_tunes_the_allocator_and_the_python_api_does_not(
    sunny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command owns its process; the Python API runs in the caller's, which it leaves as it was."""
    import yaml
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.config import config_to_dict

    calls = []
    monkeypatch.setattr(evolora.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(evolora.experiment, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = tiny_config(sunny_dir, tmp_path, **{"seeds": "[0]", "strategies": "[frozen]"})
    run_experiment(cfg)
    assert calls == []
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert calls == [1]
