"""Progress bars for long work, shown only when a display is active.

Library code wraps its loops in `task(...)`; the CLI opens one `display()` around a run so all bars share a
single live area. Without a display (library use, tests) the wrappers do nothing, so evolora never writes to
the terminal unless asked to.

Off a terminal (a log file, CI, nohup) bars cannot redraw: each one still running after a minute is told as
a log line once a minute (`EVOLORA_PROGRESS_EVERY` seconds; 0: never), so a long run's log shows it moving.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_active: Progress | None = None
_told_every: float | None = None  # off a terminal: seconds between a bar's log lines (None: on a terminal)
EVERY_ENV = "EVOLORA_PROGRESS_EVERY"


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
    )
    global _told_every
    previous, _active = _active, progress
    told_before, _told_every = _told_every, (_every() if off_terminal else None)
    try:
        if off_terminal:  # not started at all: rich before 14.3 ends even a disabled live area with a newline
            yield progress
        else:
            with progress:
                yield progress
    finally:
        _active, _told_every = previous, told_before


def _every() -> float | None:
    raw = os.environ.get(EVERY_ENV, "60")
    try:
        every = float(raw)
    except ValueError:
        every = 60.0  # a typo in a display setting is not worth stopping a run for
    return every if every > 0 else None


class Bar:
    """One bar; `advance` and `info` are no-ops when no display is active."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None, every: float | None = None) -> None:
        self._p, self._id = progress, task_id
        self._every = every
        self._next = time.monotonic() + every if every is not None else None

    def advance(self, n: float = 1) -> None:
        if self._p is not None and self._id is not None:
            self._p.advance(self._id, n)
            if self._next is not None and time.monotonic() >= self._next:
                self._tell()

    def _tell(self) -> None:
        """The bar as a log line: what it counts, how far, how long so far and (once known) how long left."""
        task = next(t for t in self._p.tasks if t.id == self._id)
        done = f"{task.completed:.0f}" + (f"/{task.total:.0f} ({task.percentage:.0f}%)" if task.total else "")
        left = f", about {_duration(task.time_remaining)} left" if task.time_remaining else ""
        info = f" ({task.fields['info']})" if task.fields.get("info") else ""  # e.g. the running loss
        logging.getLogger("evolora").info(
            "%s: %s, %s so far%s%s", task.description, done, _duration(task.elapsed or 0.0), left, info
        )
        self._next = time.monotonic() + self._every

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
        yield Bar(progress, task_id, _told_every)
    finally:
        progress.remove_task(task_id)


def log_console() -> Console | None:
    """The console of the active display, so log lines print above the bars instead of through them."""
    return _active.console if _active is not None else None
