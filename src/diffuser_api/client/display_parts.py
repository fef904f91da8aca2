"""What every progress display shares, whatever drives it (a request's WebSocket messages, a
job's events, a polled batch).

The script modes show no progress at all, so one silent and one paths-only display serve every
command; a pipe or log file gets plain lines flushed at once; a terminal gets one rich bar,
started and stopped around the command, with each saved image printed above it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, Self, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn

from diffuser_api.client.saving import SavedImage


class SavingDisplay(Protocol):
    """A display is a context manager around one command; every command reports saved images."""

    def __enter__(self) -> Self: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...

    def saved(self, image: SavedImage) -> None: ...


def saved_words(image: SavedImage) -> str:
    return f"saved {image.path} (seed {image.seed})"


class PlainDisplay:
    """Nothing to start or stop around the command."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        return None


class SilentDisplay(PlainDisplay):
    """``--json``: the JSON object at the end is the only output. It takes what any display
    takes (a request's messages, a polled batch) and shows none of it."""

    def waiting(self, what: str) -> None:
        return None

    def event(self, message: dict[str, Any]) -> None:
        return None

    def update(self, batch: dict[str, Any]) -> None:
        return None

    def saved(self, image: SavedImage) -> None:
        return None


class PathsDisplay(SilentDisplay):
    """``-q``: one saved path a line, for ``xargs`` and friends."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def saved(self, image: SavedImage) -> None:
        print(image.path, file=self._stream, flush=True)


class LinePrinter(PlainDisplay):
    """Not a terminal: plain lines, each flushed at once (logs show it live)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def saved(self, image: SavedImage) -> None:
        self._print(saved_words(image))

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)


class LiveBar:
    """A terminal: a spinner, a description and a bar of ``completed`` out of ``total``, then
    the ``columns`` a display adds (a rate, a time)."""

    def __init__(self, console: Console, description: str, *columns: ProgressColumn) -> None:
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), *columns, console=console)
        self._task = self._progress.add_task(description, total=None)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._progress.stop()

    def saved(self, image: SavedImage) -> None:
        self._progress.console.print(saved_words(image), highlight=False)

    def _show(self, description: str, **bar: float | None) -> None:
        """Redraw the description and, when given, the bar's ``total`` and ``completed``."""
        self._progress.update(self._task, description=description, **bar)
