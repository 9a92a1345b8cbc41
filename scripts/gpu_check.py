"""Check evolora on a CUDA GPU in a few minutes, unattended, and record what happened in one JSON file.

    python scripts/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget 450] [--model NAME]

Without a CUDA GPU it says so and exits 0. With one it runs, each step under what is left of `--budget`
seconds:

1. the tests marked `cuda` (`pytest -m cuda`), when the suite has any;
2. the tests that need CUDA (`EVOLORA_TEST_CUDA=1 pytest tests -k cuda_`: fp16 with loss scaling,
   QLoRA, a conventional model's full ranking; the filter takes a CPU test or two whose names say cuda);
3. the quickstart in bf16 with a larger budget (1024 samples at D1, 128 later), and its per-stage AUC;
4. `benchmarks/profile_train_step.py`: a CTR training step timed and profiled on the GPU;
5. `benchmarks/bench_ctr.py` and `benchmarks/bench_next_item.py` with short settings.

A failed step is recorded (exit status, the end of its output) and the next one runs; the JSON is rewritten
after every step, so an interrupted check still leaves what it measured. The exit status is 0 when every
step passed or was skipped, 1 otherwise. The steps need the quickstart's data and model (ML-100K and
SmolLM2-135M-Instruct): on a machine without internet, point `$EVOLORA_CACHE` at a cache that has them, or
give `--model` another model (a local folder), which the quickstart and both benchmarks then use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PESO_DATA = ROOT / ".." / "shared" / "data" / "amazon-cds-peso"  # where configs/next-item-cds-peso.yaml looks


def environment() -> dict[str, Any]:
    """The device and the versions the figures depend on."""
    import torch

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "bf16": torch.cuda.is_bf16_supported(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__},
    }
    for package in ("transformers", "peft", "bitsandbytes", "evolora"):
        try:
            info["versions"][package] = __import__(package).__version__
        except Exception as e:  # a missing optional package is a fact to record, not a failure
            info["versions"][package] = f"unavailable ({type(e).__name__})"
    return info


class Check:
    """Runs the steps within a time budget and keeps the record, written after every step."""

    def __init__(self, out: Path, budget: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget
        self.record: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.record, indent=2, default=str) + "\n")

    def run(self, name: str, cmd: list[str], cap: float, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one command with a timeout of at most `cap` seconds; its entry in the record."""
        timeout = min(cap, self.left() - 5)
        if timeout < 20:
            return self.skip(name, "the time budget is spent")
        print(f"[gpu-check] {name}: {' '.join(cmd)} (timeout {timeout:.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
            status = "ok" if proc.returncode == 0 else "failed"
            entry = {
                "status": status,
                "returncode": proc.returncode,
                "stdout": proc.stdout,
                "stderr": proc.stderr,
            }
        except subprocess.TimeoutExpired as e:
            entry = {
                "status": "failed",
                "error": f"timed out after {timeout:.0f}s",
                "stdout": _text(e.stdout),
                "stderr": _text(e.stderr),  # progress and log lines: how far it got
            }
        except OSError as e:
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']}s", flush=True)
        return entry

    def store(self, name: str, entry: dict[str, Any]) -> None:
        # Keep the ends of long outputs: enough to see what failed, small enough to read.
        for key in ("stdout", "stderr"):
            if key in entry:
                entry[key] = entry[key][-3000:] if entry["status"] != "ok" else entry[key][-600:]
        self.record["steps"][name] = entry
        self.write()

    def skip(self, name: str, reason: str) -> dict[str, Any]:
        print(f"[gpu-check] {name}: skipped ({reason})", flush=True)
        return {"status": "skipped", "reason": reason}


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def evolora_cli() -> list[str]:
    script = Path(sys.executable).parent / "evolora"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from evolora.cli import app; sys.argv[0] = 'evolora'; app()"]


# The suite hides the GPU from its tests unless this is set (tests/conftest.py).
_SEE_THE_GPU = {"EVOLORA_TEST_CUDA": "1"}


def marked_cuda_tests(check: Check) -> dict[str, Any]:
    """`pytest -m cuda`, only when some test carries the marker."""
    try:
        collect = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(10.0, min(120.0, check.left() - 5)),
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": "collecting the tests timed out"}
    if collect.returncode == 5:  # pytest: no tests collected
        return check.skip("cuda_marked_tests", "no test is marked cuda")
    if collect.returncode != 0:
        return {
            "status": "failed",
            "returncode": collect.returncode,
            "stderr": collect.stdout + collect.stderr,
        }
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda"]
    return check.run("cuda_marked_tests", cmd, cap=150, env=_SEE_THE_GPU)


def quickstart(check: Check, scratch: Path, model: str | None) -> dict[str, Any]:
    """The quickstart in bf16 with a larger budget; per strategy, the AUC of every evaluated stage."""
    sets = [
        "train.samples_per_stage=[1024,128]",
        "name=gpu-quickstart",
        f"output_dir={scratch / 'runs'}",
        "model.precision=bf16",
        *([f"model.name={model}"] if model else []),
    ]
    cmd = [*evolora_cli(), "run", "configs/quickstart.yaml", *[a for s in sets for a in ("--set", s)]]
    entry = check.run("quickstart", cmd, cap=240)
    auc: dict[str, dict[str, float]] = {}
    for path in sorted((scratch / "runs" / "gpu-quickstart").glob("*/seed*/results.json")):
        try:
            result = json.loads(path.read_text())
            stages = result.get("stages", [])
            auc[result.get("method", path.parent.parent.name)] = {
                f"stage-{s['eval_stage']}": s["metrics"]["auc"] for s in stages
            }
            entry.setdefault("train_seconds", {})[result.get("method")] = sum(
                float(s.get("train_seconds") or 0) for s in stages
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            entry.setdefault("errors", []).append(f"{path}: {type(e).__name__}: {e}")
    entry["auc_per_stage"] = auc
    return entry


def benchmark(check: Check, name: str, script: str, args: list[str], scratch: Path) -> dict[str, Any]:
    """A benchmark script with short settings; the figures it writes."""
    out = scratch / f"{name}.json"
    entry = check.run(name, [sys.executable, script, *args, "--out", str(out)], cap=120)
    if out.is_file():
        try:
            entry["figures"] = json.loads(out.read_text())
        except ValueError as e:
            entry["figures_error"] = str(e)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all the steps together")
    ap.add_argument("--model", help="the backbone of the quickstart and the benchmarks (default: theirs)")
    args = ap.parse_args()

    try:
        import torch
    except ImportError:
        print("no GPU check: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("no GPU available (torch.cuda.is_available() is False): nothing to check")
        return 0

    check = Check(Path(args.out), args.budget)
    check.record["environment"] = environment()
    check.record["model"] = args.model or "each step's default"
    check.write()
    scratch = Path(tempfile.mkdtemp(prefix="evolora-gpu-check-"))
    try:
        check.store("cuda_marked_tests", marked_cuda_tests(check))
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests", "-k", "cuda_"]
        check.store("cuda_tests", check.run("cuda_tests", cmd, cap=150, env=_SEE_THE_GPU))
        check.store("quickstart", quickstart(check, scratch, args.model))
        model_args = ["--model", args.model] if args.model else []
        # the prefix's own pass, the prefix in every row and plain HF + PEFT, at two batch sizes
        profile = ["--steps", "10", "--repeats", "2", "--batch", "8", "64", *model_args]
        check.store(
            "profile_train_step",
            benchmark(check, "profile_train_step", "benchmarks/profile_train_step.py", profile, scratch),
        )
        ctr_args = ["--samples", "32", "--batch", "8", *model_args]
        check.store("bench_ctr", benchmark(check, "bench_ctr", "benchmarks/bench_ctr.py", ctr_args, scratch))
        next_args = ["--users", "8", "--batch", "8", *model_args]
        if not PESO_DATA.is_dir():  # PESO's CDs & Vinyl release is not here: ML-100K with RQ-VAE IDs
            next_args += ["--config", "configs/next-item-ml100k.yaml"]
        check.store(
            "bench_next_item",
            benchmark(check, "bench_next_item", "benchmarks/bench_next_item.py", next_args, scratch),
        )
    except Exception as e:  # record whatever broke the check itself, then stop
        check.record["error"] = f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    steps = check.record["steps"]
    check.record["passed"] = all(s.get("status") in ("ok", "skipped") for s in steps.values()) and (
        "error" not in check.record
    )
    check.record["seconds"] = round(args.budget - check.left(), 1)
    check.write()
    print(f"[gpu-check] written: {args.out}")
    return 0 if check.record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
