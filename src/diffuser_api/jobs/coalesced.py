"""Group commits: writes asked for while one is running go together in the next one.

The jobs of one pipeline call end together (a batch file's lines eight at a time), and each
used to commit alone: eight transactions queued behind SQLite's single write lock, each a
thread hop and a commit, competing for the cores with the pipeline itself. Here a group's
first write waits, up to ``linger_s``, until ``settled()`` says no more writes are on their
way (the jobs of one pipeline call reach it a few ms apart: their images are stored one after
another), then runs; those that arrive while it runs wait for it and then go as one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

# How often a lingering group asks whether the writes it waits for have arrived.
SETTLED_CHECK_S = 0.005

Item = TypeVar("Item")
Result = TypeVar("Result")


class CoalescedWrites(Generic[Item, Result]):
    def __init__(self, write_all: Callable[[Sequence[Item]], Sequence[Result]], *, linger_s: float = 0.0,
                 settled: Callable[[], bool] = lambda: True) -> None:
        """``write_all`` is blocking (it runs in a thread) and returns one result per item;
        ``settled``: whether no other write is on its way (the linger ends as soon as it is)."""
        self._write_all = write_all
        self._linger_s = linger_s
        self._settled = settled
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def write(self, item: Item) -> Result:
        """Written even if the caller is cancelled meanwhile (a finished job stays finished)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="coalesced writes")
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        if self._linger_s:
            # Once at least: the others of a pipeline call are resolved a moment after the first.
            deadline = time.monotonic() + self._linger_s
            await asyncio.sleep(SETTLED_CHECK_S)
            while not self._settled() and time.monotonic() < deadline:
                await asyncio.sleep(SETTLED_CHECK_S)
        while self._pending:
            group, self._pending = self._pending, []
            try:
                results = await asyncio.to_thread(self._write_all, [item for item, _ in group])
            except Exception as error:  # every waiter of the group hears of it, as if it wrote alone
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(group, results, strict=True):
                if not future.done():
                    future.set_result(result)
