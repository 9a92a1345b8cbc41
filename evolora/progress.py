"""Progress bars for long work, shown only when a display is active.

Library code wraps its loops in `task(...)`; the CLI opens one `display()` around a run so all bars share a
single live area. Without a display (library use, tests) the wrappers do nothing, so evolora never writes to
the terminal unless asked to.
"""

from __future__ import annotations

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
    previous, _active = _active, progress
    try:
        if off_terminal:  # not started at all: rich before 14.3 ends even a disabled live area with a newline
            yield progress
        else:
            with progress:
                yield progress
    finally:
        _active = previous


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
