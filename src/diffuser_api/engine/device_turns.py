"""One batch at a time per device, across every model placed on it.

Two models on one GPU that ran batches at once would fight for its memory and compute (and
may run out of memory where either alone fits). Each worker takes its device's turn around a
pipeline call. Turns are granted in order of request within the best waiting priority class,
so models with work waiting alternate (round-robin) instead of the busiest one keeping the
device. A waiter's class is asked when the device frees up, not when it began to wait: it is
the best effective class (``engine.priority``, with ageing) of the batch its worker holds, so
a batch of async jobs waiting behind other models' interactive batches moves up as it ages,
as it would in its own model's queue. The workers of one
model that already holds the turn may join it while nobody else waits: they share that
model's weights, as they do with no other model around.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from diffuser_api.engine.priority import Priority
from diffuser_api.engine.runner import ModelRunner

# The effective priority class of what a waiter has waiting now (lower goes first).
WaitingClass = Callable[[], int]


def _interactive() -> int:
    return Priority.INTERACTIVE


def device_of(runner: ModelRunner) -> str:
    """Runners are named ``<device>#<index>`` (``cuda:0#1``); a name without ``#`` is its device."""
    return runner.name.rpartition("#")[0] or runner.name


@dataclass
class _Ticket:
    waiting_class: WaitingClass
    number: int
    owner: Hashable
    granted: bool = False

    def rank(self) -> tuple[int, int]:
        return self.waiting_class(), self.number


@dataclass
class _Device:
    owner: Hashable | None = None
    holders: int = 0
    waiting: list[_Ticket] = field(default_factory=list)


class DeviceTurns:
    """Shared by every engine of a registry; owners are compared by identity (one per model)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._devices: dict[str, _Device] = {}
        self._numbers = itertools.count()

    @contextlib.contextmanager
    def turn(self, device: str, owner: Hashable, waiting_class: WaitingClass = _interactive) -> Iterator[None]:
        """Block until ``owner`` may run on ``device``; release the turn when the block ends.

        ``waiting_class`` is called (under this lock, so it must not wait for a turn) each
        time the device frees up while ``owner`` waits."""
        self._acquire(device, owner, waiting_class)
        try:
            yield
        finally:
            self._release(device)

    def _acquire(self, device: str, owner: Hashable, waiting_class: WaitingClass) -> None:
        with self._lock:
            state = self._devices.setdefault(device, _Device())
            if state.owner is None or (state.owner is owner and not state.waiting):
                state.owner = owner
                state.holders += 1
                return
            ticket = _Ticket(waiting_class, next(self._numbers), owner)
            state.waiting.append(ticket)
            while not ticket.granted:
                self._lock.wait()

    def _release(self, device: str) -> None:
        with self._lock:
            state = self._devices[device]
            state.holders -= 1
            if state.holders:
                return
            state.owner = None
            if not state.waiting:
                return
            # The best ticket's owner gets the device, with every ticket it has waiting.
            owner = min(state.waiting, key=_Ticket.rank).owner
            granted = [ticket for ticket in state.waiting if ticket.owner is owner]
            state.waiting = [ticket for ticket in state.waiting if ticket.owner is not owner]
            state.owner, state.holders = owner, len(granted)
            for ticket in granted:
                ticket.granted = True
            self._lock.notify_all()
