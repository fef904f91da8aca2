"""What the user sees while the server works: a live display, plain lines, paths only, or nothing.

The server's WebSocket messages (queued, loading, progress) drive it; saved images are reported
as they land. A terminal gets a redrawn bar (rich); a pipe or a log file gets one line per
event, which ``tail -f`` and CI logs can read; scripts ask for paths only (``-q``) or nothing
but the final JSON (``--json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, Self, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from diffuser_api.client.saving import SavedImage

RATE_WINDOW_S = 0.5  # the shortest time a rate (and an ETA) is measured over


class Display(Protocol):
    """Used as a context manager around one request."""

    def __enter__(self) -> Self: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...

    def waiting(self, what: str) -> None:
        """The request is sent; the server has not said anything yet."""

    def event(self, message: dict[str, Any]) -> None:
        """A WebSocket message other than ``completed`` (which the caller saves, then reports),
        or ``running`` (a job has started, no step yet)."""

    def saved(self, image: SavedImage) -> None: ...


def step_words(step: int, total: int, rate: float | None) -> str:
    """``step 3/8 · 2.5 steps/s · ETA 2s``: rate and ETA once two steps have been timed."""
    words = f"step {step}/{total}"
    if rate:
        words += f" · {rate:.1f} steps/s · ETA {max(total - step, 0) / rate:.0f}s"
    return words


def saved_words(image: SavedImage) -> str:
    return f"saved {image.path} (seed {image.seed})"


class _Quiet:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        return None

    def waiting(self, what: str) -> None:
        return None

    def event(self, message: dict[str, Any]) -> None:
        return None


class SilentDisplay(_Quiet):
    """``--json``: the JSON object at the end is the only output."""

    def saved(self, image: SavedImage) -> None:
        return None


class PathsDisplay(_Quiet):
    """``-q``: one saved path a line, for ``xargs`` and friends."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def saved(self, image: SavedImage) -> None:
        print(image.path, file=self._stream, flush=True)


class LineDisplay(_Quiet):
    """Not a terminal: one plain line per event, flushed at once (logs show it live)."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._first_step: tuple[int, float] | None = None

    def waiting(self, what: str) -> None:
        self._print(f"{what}: waiting for the server")

    def event(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "queued":
            self._print(f"queued: position {message.get('position')}")
        elif kind == "loading":
            self._print("loading the model")
        elif kind == "running":
            self._print("running")
        elif kind == "progress":
            step, total = int(message["step"]), int(message["total_steps"])
            self._print(step_words(step, total, self._rate(step)))

    def saved(self, image: SavedImage) -> None:
        self._print(saved_words(image))

    def _rate(self, step: int) -> float | None:
        now = self._clock()
        if self._first_step is None or step < self._first_step[0]:
            self._first_step = (step, now)
            return None
        first, started = self._first_step
        # A job's events start with its stored state, then a burst of live steps: too short a
        # window would report thousands of steps a second.
        return (step - first) / (now - started) if now - started >= RATE_WINDOW_S and step > first else None

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)


class StepRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.1f} steps/s" if speed else "", style="progress.data.speed")


class LiveDisplay:
    """A terminal: a spinner while waiting, then a bar with step x/y, rate and ETA."""

    def __init__(self, console: Console, what: str) -> None:
        self._console = console
        self._what = what
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            StepRateColumn(), TimeRemainingColumn(), console=console,
        )
        self._task = self._progress.add_task(f"{what}: connecting", total=None)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self._progress.update(self._task, description=f"{self._what}: done")
        self._progress.stop()

    def waiting(self, what: str) -> None:
        self._progress.update(self._task, description=f"{what}: waiting for the server")

    def event(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "queued":
            self._progress.update(self._task, description=f"{self._what}: queued, position {message.get('position')}")
        elif kind == "loading":
            self._progress.update(self._task, description=f"{self._what}: loading the model")
        elif kind == "running":
            self._progress.update(self._task, description=f"{self._what}: running")
        elif kind == "progress":
            self._progress.update(self._task, description=f"{self._what}: step", total=int(message["total_steps"]),
                                  completed=int(message["step"]))

    def saved(self, image: SavedImage) -> None:
        self._progress.console.print(saved_words(image), highlight=False)
