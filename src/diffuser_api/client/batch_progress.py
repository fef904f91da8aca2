"""What ``batch submit --wait`` and ``batch wait`` show while a batch runs: its status and
``request_counts``, redrawn as a bar on a terminal, one line per change otherwise.

A batch has no event stream: the client polls it, so the display gets the batch object each
time and reports only what changed (a log file gets one line per step forward, not per poll).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, Self, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from diffuser_api.client.progress import saved_words
from diffuser_api.client.saving import SavedImage


class BatchDisplay(Protocol):
    def __enter__(self) -> Self: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...

    def update(self, batch: dict[str, Any]) -> None:
        """The batch as last polled."""

    def saved(self, image: SavedImage) -> None: ...


def counts_of(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(total, completed, failed) of ``request_counts``; all zero while the file is validated."""
    counts = batch.get("request_counts") or {}
    return int(counts.get("total") or 0), int(counts.get("completed") or 0), int(counts.get("failed") or 0)


def progress_words(batch: dict[str, Any]) -> str:
    """``in_progress: 2/4 done, 1 failed``."""
    total, completed, failed = counts_of(batch)
    words = f"{batch['status']}: {completed + failed}/{total} done"
    return words + (f", {failed} failed" if failed else "")


class _Quiet:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        return None

    def update(self, batch: dict[str, Any]) -> None:
        return None


class SilentBatchDisplay(_Quiet):
    """``--json``: the JSON object at the end is the only output."""

    def saved(self, image: SavedImage) -> None:
        return None


class PathsBatchDisplay(_Quiet):
    """``-q``: one saved path a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def saved(self, image: SavedImage) -> None:
        print(image.path, file=self._stream, flush=True)


class LineBatchDisplay(_Quiet):
    """Not a terminal: a line each time the status or the counts change."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last: str | None = None

    def update(self, batch: dict[str, Any]) -> None:
        words = progress_words(batch)
        if words != self._last:
            self._last = words
            print(f"batch {batch['id']} {words}", file=self._stream, flush=True)

    def saved(self, image: SavedImage) -> None:
        print(saved_words(image), file=self._stream, flush=True)


class LiveBatchDisplay:
    """A terminal: a bar of the lines done (completed or failed) out of the total."""

    def __init__(self, console: Console, batch_id: str) -> None:
        self._batch_id = batch_id
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self._task = self._progress.add_task(f"batch {batch_id}: waiting for the server", total=None)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, batch: dict[str, Any]) -> None:
        total, completed, failed = counts_of(batch)
        failures = f" ({failed} failed)" if failed else ""
        self._progress.update(self._task, description=f"batch {self._batch_id}: {batch['status']}{failures}",
                              total=total or None, completed=completed + failed)

    def saved(self, image: SavedImage) -> None:
        self._progress.console.print(saved_words(image), highlight=False)


def batch_display(mode: str, stream: TextIO, batch_id: str) -> BatchDisplay:
    """The display for an output mode (see ``Output``)."""
    if mode == "live":
        return LiveBatchDisplay(Console(file=stream), batch_id)
    if mode == "lines":
        return LineBatchDisplay(stream)
    if mode == "paths":
        return PathsBatchDisplay(stream)
    return SilentBatchDisplay()
