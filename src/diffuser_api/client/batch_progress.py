"""What ``batch submit --wait`` and ``batch wait`` show while a batch runs: its status and
``request_counts``, redrawn as a bar on a terminal, one line per change otherwise.

A batch has no event stream: the client polls it, so the display gets the batch object each
time and reports only what changed (a log file gets one line per step forward, not per poll).
"""

from __future__ import annotations

from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import TimeElapsedColumn

from diffuser_api.client.display_parts import LinePrinter, LiveBar, PathsDisplay, SavingDisplay, SilentDisplay


class BatchDisplay(SavingDisplay, Protocol):
    def update(self, batch: dict[str, Any]) -> None:
        """The batch as last polled."""


def counts_of(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(total, completed, failed) of ``request_counts``; all zero while the file is validated."""
    counts = batch.get("request_counts") or {}
    return int(counts.get("total") or 0), int(counts.get("completed") or 0), int(counts.get("failed") or 0)


def progress_words(batch: dict[str, Any]) -> str:
    """``in_progress: 2/4 done, 1 failed``."""
    total, completed, failed = counts_of(batch)
    words = f"{batch['status']}: {completed + failed}/{total} done"
    return words + (f", {failed} failed" if failed else "")


class LineBatchDisplay(LinePrinter):
    """Not a terminal: a line each time the status or the counts change."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._last: str | None = None

    def update(self, batch: dict[str, Any]) -> None:
        words = progress_words(batch)
        if words != self._last:
            self._last = words
            self._print(f"batch {batch['id']} {words}")


class LiveBatchDisplay(LiveBar):
    """A terminal: a bar of the lines done (completed or failed) out of the total."""

    def __init__(self, console: Console, batch_id: str) -> None:
        super().__init__(console, f"batch {batch_id}: waiting for the server", TimeElapsedColumn())
        self._batch_id = batch_id

    def update(self, batch: dict[str, Any]) -> None:
        total, completed, failed = counts_of(batch)
        failures = f" ({failed} failed)" if failed else ""
        self._show(f"batch {self._batch_id}: {batch['status']}{failures}", total=total or None,
                   completed=completed + failed)


def batch_display(mode: str, stream: TextIO, batch_id: str) -> BatchDisplay:
    """The display for an output mode (see ``Output``)."""
    if mode == "live":
        return LiveBatchDisplay(Console(file=stream), batch_id)
    if mode == "lines":
        return LineBatchDisplay(stream)
    if mode == "paths":
        return PathsDisplay(stream)
    return SilentDisplay()
