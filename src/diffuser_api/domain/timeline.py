"""When each phase of a request ran, in wall-clock time, so a trace can show it afterwards.

Phases run on the model worker and the codec pool, where no tracing context is at hand.
Recording plain timestamps keeps every layer free of the tracing library (an optional extra);
the API turns the phases into spans once the request has ended.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

AttributeValue = str | int | float | bool


@dataclass(frozen=True)
class Phase:
    name: str
    start_ns: int  # Unix epoch nanoseconds, as OpenTelemetry takes them
    end_ns: int
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


class Timeline:
    """The phases of one request; several codec threads add to it at once."""

    def __init__(self) -> None:
        self._phases: list[Phase] = []
        self._lock = threading.Lock()

    def add(self, *phases: Phase) -> None:
        with self._lock:
            self._phases.extend(phases)

    @contextlib.contextmanager
    def phase(self, name: str, **attributes: AttributeValue) -> Iterator[None]:
        """Times the block; a block that raises is recorded too."""
        start = time.time_ns()
        try:
            yield
        finally:
            self.add(Phase(name, start, time.time_ns(), attributes))

    @property
    def phases(self) -> tuple[Phase, ...]:
        with self._lock:
            return tuple(self._phases)
