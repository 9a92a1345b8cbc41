"""Progress bars for long work, shown only when a display is active.

Library code wraps its loops in `task(...)`; the CLI opens one `display()` around a run so all bars share a
single live area. Without a display (library use, tests) the wrappers do nothing, so evolora never writes to
the terminal unless asked to.

Off a terminal (a log file, CI, nohup) bars cannot redraw: whenever the log has said nothing for a minute
(`EVOLORA_PROGRESS_EVERY` seconds; 0: never), each bar then running is told as a log line, so a long run's
log shows it moving. A thread watches the silence, not the bars' steps: a chain of bars shorter than a
minute each, or one step longer than that, would otherwise leave the log silent for minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_active: Progress | None = None
_open: list[Progress] = []  # every display open, outermost first (a heartbeat tells all their bars)
EVERY_ENV = "EVOLORA_PROGRESS_EVERY"
SPEED_WINDOW_S = 600.0  # the seconds of advances the time remaining is estimated from


@contextmanager
def display(console: Console | None = None) -> Iterator[Progress]:
    """Show progress bars for everything run inside the block."""
    global _active
    # Off a terminal (a log file, CI) bars cannot redraw; a live area would only leave a blank line.
    off_terminal = console is not None and not (console.is_terminal or console.is_jupyter)
    progress = Progress(
        # Descriptions name files and methods of the user's: shown as written, never read as markup.
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=off_terminal,
        # rich estimates the speed over the last 30 s: a step slower than that (an epoch of SmolLM2 on busy
        # cores) left one sample in the window, so no time remaining was shown for the whole epoch
        speed_estimate_period=SPEED_WINDOW_S,
    )
    previous, _active = _active, progress
    _open.append(progress)
    every = _every() if off_terminal else None
    try:
        if off_terminal:  # not started at all: rich before 14.3 ends even a disabled live area with a newline
            # one heartbeat a process (a display inside another: the outer's tells its bars too)
            beat = _Heartbeat(every) if every is not None and _Heartbeat.running is None else None
            with beat if beat is not None else contextlib.nullcontext():
                yield progress
        else:
            with progress:
                yield progress
    finally:
        _active = previous
        _open.remove(progress)


class _Heartbeat(logging.Handler):
    """Off a terminal: once the `evolora` log has been silent for `every` seconds, each running bar of the
    open displays is told as a line (which ends the silence). A handler on that logger: any line counts."""

    running: _Heartbeat | None = None  # the process's one

    def __init__(self, every: float) -> None:
        super().__init__()
        self.every = every
        self.last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="evolora-progress", daemon=True)

    def emit(self, record: logging.LogRecord) -> None:
        self.last_line = time.monotonic()

    def __enter__(self) -> _Heartbeat:
        _Heartbeat.running = self
        logging.getLogger("evolora").addHandler(self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Undone before the wait: a second Ctrl-C during it must not leave the handler on the logger.
        self._stop.set()
        logging.getLogger("evolora").removeHandler(self)
        _Heartbeat.running = None
        self._thread.join()

    def _watch(self) -> None:
        pause = min(1.0, max(self.every / 4, 0.05))  # (tests ask for lines every few milliseconds)
        while not self._stop.wait(pause):
            if time.monotonic() - self.last_line < self.every:
                continue
            # Read under the display's lock: a bar advanced meanwhile would change the samples its speed
            # is read from. Told outside it.
            lines = []
            for progress in list(_open):
                with progress._lock:
                    lines += [_told(running) for running in progress.tasks]
            for line in lines:
                logging.getLogger("evolora").info("%s", line)
            self.last_line = time.monotonic()  # (with no bar running, the next is told a full period on)


def _every() -> float | None:
    raw = os.environ.get(EVERY_ENV, "60")
    try:
        every = float(raw)
    except ValueError:
        every = 60.0  # a typo in a display setting is not worth stopping a run for
    return every if every > 0 else None


def _told(task: Task) -> str:
    """A bar as a log line: what it counts, how far, how long so far and (once known) how long left."""
    done = f"{task.completed:.0f}" + (f"/{task.total:.0f} ({task.percentage:.0f}%)" if task.total else "")
    done = "" if task.total is None and not task.completed else f"{done}, "  # (a bar without steps: time)
    left = f", about {_duration(task.time_remaining)} left" if task.time_remaining else ""
    info = f" ({task.fields['info']})" if task.fields.get("info") else ""  # e.g. the running loss
    return f"{task.description}: {done}{_duration(task.elapsed or 0.0)} so far{left}{info}"


class Bar:
    """One bar; `advance` and `info` are no-ops when no display is active."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None) -> None:
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._p is not None and self._id is not None:
            self._p.advance(self._id, n)

    def info(self, text: str) -> None:
        if self._p is not None and self._id is not None:
            self._p.update(self._id, info=text)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@contextmanager
def task(description: str, total: float | None) -> Iterator[Bar]:
    progress = _active
    if progress is None:
        yield Bar(None, None)
        return
    task_id = progress.add_task(description, total=total, info="")
    try:
        yield Bar(progress, task_id)
    finally:
        progress.remove_task(task_id)


def log_console() -> Console | None:
    """The console of the active display, so log lines print above the bars instead of through them."""
    return _active.console if _active is not None else None
