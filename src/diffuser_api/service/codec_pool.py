"""The small thread pool that decodes uploads and encodes results, with a bounded queue.

Decoding and encoding are CPU work that must block neither the event loop nor a model worker,
and a pool that queues without end lets a burst of uploads hold memory and delay every other
request's encoding. So new work beyond ``threads + max_queue`` tasks is refused at once (429),
like a full model queue.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from diffuser_api.errors import Overloaded, Unavailable

T = TypeVar("T")

# Codec tasks take milliseconds to a second: a client refused for a full pool may retry soon.
RETRY_AFTER_S = 1.0


def _lower_priority(niceness: int) -> None:
    """On Linux a thread is a task of its own: ``nice`` changes the calling thread alone."""
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)


class CodecPool:
    """Counts tasks waiting or running; the count drops when a task ends in its thread, not when
    the request that asked for it goes away, so abandoned work still holds its place until done."""

    def __init__(self, threads: int, max_queue: int, *, niceness: int = 0) -> None:
        """``niceness`` > 0: the pool's threads yield the cores to everything else of the
        process (the OS scheduler weighs them less), for work no client is waiting on."""
        self._executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="codec", initializer=_lower_priority, initargs=(niceness,)
        )
        self._capacity = threads + max_queue
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._pending = 0

    def submit(self, function: Callable[..., T], *args: object) -> Future[T]:
        """Start new work (decoding an upload), or raise ``Overloaded`` when the pool is full."""
        return self._start(function, args, refusable=True)

    async def run(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self.submit(function, *args))

    async def run_admitted(self, function: Callable[..., T], *args: object) -> T:
        """Finish work already accepted (encoding a generated image): never refused, since that
        would throw the model's work away, but counted, so new work waits its turn behind it."""
        return await asyncio.wrap_future(self._start(function, args, refusable=False))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self, function: Callable[..., T], args: tuple[object, ...], *, refusable: bool) -> Future[T]:
        with self._lock:
            if refusable and self._pending >= self._capacity:
                raise Overloaded(
                    f"the image codec queue is full ({self._max_queue} tasks waiting); retry later",
                    retry_after=RETRY_AFTER_S,
                )
            self._pending += 1
        try:
            future = self._executor.submit(function, *args)
        except RuntimeError:  # the pool was closed: the server is shutting down
            self._finished()
            raise Unavailable("the server is shutting down", retry_after=RETRY_AFTER_S) from None
        future.add_done_callback(lambda _: self._finished())
        return future

    def _finished(self) -> None:
        with self._lock:
            self._pending -= 1
