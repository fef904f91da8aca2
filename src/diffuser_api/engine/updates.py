"""One job's life as a sequence of updates: queue positions while it waits, step reports while
it runs, then its images. Streams (SSE, WebSocket) and Ray replicas both watch a job this way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from diffuser_api.domain import GeneratedImage, ImageJob, StepProgress
from diffuser_api.engine.backend import ModelBackend
from diffuser_api.engine.job import JobTiming, WorkerEncoders
from diffuser_api.engine.priority import Priority

# How often a waiting job's queue position is read again (and a stream may send a ping).
QUEUE_POLL_S = 0.25


@dataclass(frozen=True)
class QueuePosition:
    position: int


@dataclass(frozen=True)
class Finished:
    images: list[GeneratedImage]


JobUpdate = QueuePosition | StepProgress | Finished


async def job_updates(
    backend: ModelBackend,
    job: ImageJob,
    timing: JobTiming | None = None,
    deadline: float | None = None,
    priority: Priority = Priority.INTERACTIVE,
    encoders: WorkerEncoders | None = None,
) -> AsyncIterator[JobUpdate]:
    """Submit the job and follow it; the job's own error is raised; closing early cancels it."""
    progress: asyncio.Queue[StepProgress] = asyncio.Queue()
    task = asyncio.ensure_future(backend.submit(job, progress.put_nowait, timing, deadline, priority,
                                                encoders=encoders))
    last_position: int | None = None
    getter: asyncio.Future[StepProgress] | None = None
    try:
        while not task.done():
            getter = getter or asyncio.ensure_future(progress.get())
            done, _ = await asyncio.wait({getter, task}, timeout=QUEUE_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                getter = None
            elif not done and (position := backend.queue_position(job)) not in (None, last_position):
                last_position = position
                yield QueuePosition(position)
        if getter is not None:
            getter.cancel()
            getter = None
        # Progress posted just before the result may still be waiting in the queue.
        while not progress.empty():
            yield progress.get_nowait()
        yield Finished(task.result())
    finally:
        if getter is not None:
            getter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
