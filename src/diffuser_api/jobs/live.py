"""Events of the jobs running in this process, for the clients following them right now.

A job that runs on another replica is followed through the database instead (its progress is
written there at the poll rate); only this process sees every step and the previews.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from diffuser_api.service.streaming import PartialImage, Step

LiveEvent = Step | PartialImage
# A follower that falls this far behind loses the oldest progress, never blocks the job.
FOLLOWER_BACKLOG = 256


class LiveJob:
    def __init__(self) -> None:
        self._followers: set[asyncio.Queue[LiveEvent | None]] = set()
        self._closed = False
        self.partial_counts: dict[int, int] = {}

    @property
    def followed(self) -> bool:
        return bool(self._followers)

    def publish(self, event: LiveEvent) -> None:
        for queue in self._followers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    def close(self) -> None:
        """The job's outcome is stored: followers read it from the database."""
        self._closed = True
        for queue in self._followers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    async def follow(self) -> AsyncIterator[LiveEvent]:
        queue: asyncio.Queue[LiveEvent | None] = asyncio.Queue(FOLLOWER_BACKLOG)
        if self._closed:
            return
        self._followers.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._followers.discard(queue)


class LiveJobs:
    """Job id -> its live events, while it runs here."""

    def __init__(self) -> None:
        self._jobs: dict[str, LiveJob] = {}

    def open(self, job_id: str) -> LiveJob:
        live = self._jobs[job_id] = LiveJob()
        return live

    def get(self, job_id: str) -> LiveJob | None:
        return self._jobs.get(job_id)

    def close(self, job_id: str) -> None:
        live = self._jobs.pop(job_id, None)
        if live is not None:
            live.close()
