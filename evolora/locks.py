"""Exclusive locks on run folders, so two processes never write the same results.

A lock is an `flock` on a small file that also names its holder (process, host, command, start time). The
operating system releases it when the holder exits, however it exits (`kill -9` included), so a lock can
never be left behind by a dead process; the file itself stays and is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from evolora import parallel
from evolora.errors import EvoloraError
from evolora.io import remove_killed_copies

log = logging.getLogger("evolora")


class LockedError(EvoloraError):
    """Another process holds the lock; the message names it."""


def _holder() -> dict[str, object]:
    program = Path(sys.argv[0]).name if sys.argv else "?"
    if program == "__main__.py":  # `python -m evolora` (as `accelerate launch -m evolora` starts it)
        program = "python -m evolora"
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([program, *sys.argv[1:]]),
        "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def describe_holder(path: Path) -> str:
    """Who holds the lock file `path`, as recorded by the holder (best effort)."""
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
        return f"process {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def exclusive(path: str | Path, what: str, wait: bool = False, every_process: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block.

    Held by another process: raise `LockedError` naming the holder, or with `wait` log who it is and block
    until it is released. In a multi-process launch the main process takes it and the others wait for that;
    with `every_process` each takes it in turn, as unrelated processes do (a shared cache's fill).
    """
    if not every_process and not parallel.writes():
        parallel.barrier()
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(path)
            if not wait:
                raise LockedError(
                    f"{what} is in use by {holder}. Wait for it to finish (or stop it), then rerun; "
                    f"the lock is {path}"
                ) from None
            log.info("waiting for %s, which holds %s", holder, what)
            t0 = time.perf_counter()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            log.info("%s is free after %.0f s", what, time.perf_counter() - t0)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()))
        f.flush()
        if not every_process:
            parallel.barrier()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


@contextlib.contextmanager
def sole_writer(folder: Path, what: str) -> Iterator[int]:
    """Hold the lock beside `folder` (one writer of it at a time: an export's folder) and first remove what
    writes of it that were killed left there (`io.remove_killed_copies`); yields how many copies went."""
    with exclusive(folder.parent / f".{folder.name}.lock", what):
        yield remove_killed_copies(folder)
