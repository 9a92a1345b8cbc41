"""Worker processes: one experiment's (strategy, seed) pairs spread over N processes (`evolora run --jobs N`).

This module only runs functions in processes; what a worker does is the caller's (`experiment.py`). Pairs
wait in one queue (`work_queue`) and each worker takes the next when it is free (`take`), so no core idles
while work is left: pairs differ in cost (LSAT trains two adapters, a resumed pair may have one stage
left, a finished one none), and a split fixed before the start left one worker running alone for as long
as the longest share's excess. Each run's record says which worker ran it. Workers coordinate through
the files they already use: a training job shared by several pairs (every strategy's stage 1) is trained
under the shared store's lock by the first worker to reach it, and the others wait and reuse it
(`continual/loop.py`).

Processes are started with `spawn` (no inherited threads or CUDA state). A worker that sees its parent
gone stops at once, so killing `evolora run` (even with kill -9) leaves no orphan writing to the run; the
rerun resumes as after any interruption. A spawned process starts with Python's default warning filters
and transformers' default logging, so each worker is given its parent's (what `evolora run` silenced stays
silent in its workers' output). The first worker to fail stops the others; its error is raised in
the parent (a user error as the same one-line message, anything else with the worker's traceback).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from evolora.errors import EvoloraError
from evolora.parallel import stop_with_parent

log = logging.getLogger("evolora")

WORKER_ENV = "EVOLORA_WORKER"  # a worker's label, e.g. "worker 2/4"
T = TypeVar("T")


class WorkerError(RuntimeError):
    """A worker failed with a programming error; the message carries its traceback."""


def worker_label() -> str:
    """Who this process is in records: `worker i/N` inside `--jobs N`, else `main (pid P)`."""
    return os.environ.get(WORKER_ENV) or f"main (pid {os.getpid()})"


def work_queue(items: Sequence[T], workers: int) -> Any:
    """A queue for `workers` spawned processes holding `items` in order, then one end mark per worker."""
    work = mp.get_context("spawn").Queue()
    for item in items:
        work.put(item)
    for _ in range(workers):
        work.put(None)  # items are never None
    return work


def take(work: Any) -> Iterator[Any]:
    """The items this worker takes from a `work_queue`, one at a time as it asks, until its end mark."""
    while (item := work.get()) is not None:
        yield item


def devices_for(device: str, jobs: int) -> list[str]:
    """One GPU per worker where several are (round-robin), else every worker on the configured device."""
    import torch

    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(jobs)]
    return [device] * jobs


def run_workers(target: Callable[..., None], per_worker: Sequence[tuple[Any, ...]]) -> None:
    """Run `target(*args)` in one spawned process per entry of `per_worker` and wait for all of them."""
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    quiet = _output_settings()
    n = len(per_worker)
    procs = []
    for i, args in enumerate(per_worker):
        label = f"worker {i + 1}/{n}"
        p = ctx.Process(
            target=_entry, args=(target, label, args, messages, quiet, os.getpid()), name=label, daemon=False
        )
        p.start()
        procs.append((label, p))
    try:
        failure = _wait(procs, messages)
    except BaseException:  # Ctrl-C in the parent: the workers go too (their work so far is kept)
        _stop(procs)
        raise
    if failure is not None:
        _stop(procs)
        label, kind, text = failure
        if kind == "user":
            raise EvoloraError(f"{label}: {text}")
        if kind == "gone":  # no traceback to show: what happened to it, in one line
            raise EvoloraError(f"{label} {text}; rerun the same command to continue where it stopped")
        raise WorkerError(f"{label} failed:\n{text}")


def _gone(exitcode: int) -> str:
    """How a worker that never reported ended: a signal (kill, the out-of-memory killer) or an exit code."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "an unknown signal"
        hint = " (out of memory? the kernel's OOM killer sends it)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by signal {-exitcode}, {name}{hint}"
    return f"exited with code {exitcode} before finishing"


def _wait(procs: list[tuple[str, Any]], messages: Any) -> tuple[str, str, str] | None:
    """Until every worker has reported (or died); the first failure, or None."""
    reported: dict[str, tuple[str, str]] = {}
    while len(reported) < len(procs):
        try:
            label, kind, text = messages.get(timeout=0.5)
            reported[label] = (kind, text)
            if kind != "ok":
                return label, kind, text
        except queue.Empty:
            for label, p in procs:
                if label not in reported and not p.is_alive() and p.exitcode is not None:
                    # Gone without a word (killed, out of memory): give its last message a moment to arrive.
                    time.sleep(0.5)
                    try:
                        while True:
                            lab, kind, text = messages.get_nowait()
                            reported[lab] = (kind, text)
                            if kind != "ok":
                                return lab, kind, text
                    except queue.Empty:
                        pass
                    if label not in reported:
                        return label, "gone", _gone(p.exitcode)
    for _, p in procs:
        p.join()
    return None


def _stop(procs: list[tuple[str, Any]]) -> None:
    for _, p in procs:
        if p.is_alive():
            p.terminate()
    for _, p in procs:
        p.join(timeout=30)


def _output_settings() -> dict[str, Any]:
    """What this process shows of its libraries' warnings and logs, for a worker to adopt."""
    from transformers.utils import logging as hf_logging

    # a filter on a warning class defined in a script could not be unpickled in the worker: left out
    kept = [f for f in warnings.filters if getattr(f[2], "__module__", "") != "__main__"]
    return {
        "warnings": kept,
        "hf_verbosity": hf_logging.get_verbosity(),
        "hf_progress": hf_logging.is_progress_bar_enabled(),
    }


def _adopt_output_settings(settings: dict[str, Any]) -> None:
    from transformers.utils import logging as hf_logging

    warnings.filters[:] = settings["warnings"]
    hf_logging.set_verbosity(settings["hf_verbosity"])
    if not settings["hf_progress"]:
        hf_logging.disable_progress_bar()


def _entry(
    target: Callable[..., None],
    label: str,
    args: tuple[Any, ...],
    messages: Any,
    quiet: dict[str, Any],
    parent: int,
) -> None:
    stop_with_parent(parent)  # passed from the parent: one killed while this process imported is gone
    os.environ[WORKER_ENV] = label
    _adopt_output_settings(quiet)
    try:
        target(*args)
    except EvoloraError as e:
        messages.put((label, "user", str(e)))
        raise SystemExit(2) from None
    except BaseException:
        messages.put((label, "crash", traceback.format_exc()))
        raise SystemExit(1) from None
    messages.put((label, "ok", ""))
