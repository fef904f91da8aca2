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
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import ProgressColumn, Task, TimeRemainingColumn
from rich.text import Text

from diffuser_api.client.display_parts import LinePrinter, LiveBar, SavingDisplay

RATE_WINDOW_S = 0.5  # the shortest time a rate (and an ETA) is measured over


class Display(SavingDisplay, Protocol):
    """Used as a context manager around one request."""

    def waiting(self, what: str) -> None:
        """The request is sent; the server has not said anything yet."""

    def event(self, message: dict[str, Any]) -> None:
        """A WebSocket message other than ``completed`` (which the caller saves, then reports),
        or ``running`` (a job has started, no step yet)."""


def step_words(step: int, total: int, rate: float | None) -> str:
    """``step 3/8 · 2.5 steps/s · ETA 2s``: rate and ETA once two steps have been timed."""
    words = f"step {step}/{total}"
    if rate:
        words += f" · {rate:.1f} steps/s · ETA {max(total - step, 0) / rate:.0f}s"
    return words


class LineDisplay(LinePrinter):
    """Not a terminal: one plain line per event."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(stream)
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

    def _rate(self, step: int) -> float | None:
        now = self._clock()
        if self._first_step is None or step < self._first_step[0]:
            self._first_step = (step, now)
            return None
        first, started = self._first_step
        # A job's events start with its stored state, then a burst of live steps: too short a
        # window would report thousands of steps a second.
        return (step - first) / (now - started) if now - started >= RATE_WINDOW_S and step > first else None


class StepRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.1f} steps/s" if speed else "", style="progress.data.speed")


class LiveDisplay(LiveBar):
    """A terminal: a spinner while waiting, then a bar with step x/y, rate and ETA."""

    def __init__(self, console: Console, what: str) -> None:
        super().__init__(console, f"{what}: connecting", StepRateColumn(), TimeRemainingColumn())
        self._what = what

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self._show(f"{self._what}: done")
        super().__exit__(kind, error, trace)

    def waiting(self, what: str) -> None:
        self._show(f"{what}: waiting for the server")

    def event(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "queued":
            self._show(f"{self._what}: queued, position {message.get('position')}")
        elif kind == "loading":
            self._show(f"{self._what}: loading the model")
        elif kind == "running":
            self._show(f"{self._what}: running")
        elif kind == "progress":
            self._show(f"{self._what}: step", total=int(message["total_steps"]), completed=int(message["step"]))
