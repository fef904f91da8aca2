"""The shared job queue and the rule that groups compatible jobs into one pipeline call."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from diffuser_api.engine.job import Job


@dataclass(frozen=True)
class BatchLimits:
    max_items: int
    max_pixels: int
    wait_s: float


class QueueClosed(Exception):
    """The engine is stopping; no more jobs will come out."""


class JobQueue:
    """A bounded FIFO that workers take *batches* from.

    One queue serves every worker of a model, so an idle device takes the next job rather than
    waiting behind a busy one. A batch starts with the oldest job and gathers later jobs with
    the same batch key, so an incompatible job is never starved by ones that arrive after it.

    A request too large for one batch comes as several jobs (its chunks); the bound counts
    requests, so a large request is never refused by a queue that has room for it.
    """

    def __init__(self, max_requests: int) -> None:
        self._max_requests = max_requests
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.arrivals = 0  # requests ever offered: a worker compares it to see if others came meanwhile

    def __len__(self) -> int:
        """Requests waiting (a split request counts once)."""
        with self._ready:
            return len({id(job.whole) for job in self._jobs})

    @property
    def full(self) -> bool:
        return len(self) >= self._max_requests

    def offer(self, jobs: Sequence[Job]) -> bool:
        """Add one request's jobs, all or none, unless the queue is full or closed; never blocks.

        Wakes every waiting worker: a single wake-up may reach a worker gathering a batch the
        job cannot join, which ignores it while an idle worker sleeps on.
        """
        with self._ready:
            if self._closed or len(self) >= self._max_requests:
                return False
            self._jobs.extend(jobs)
            self.arrivals += 1
            self._ready.notify_all()
            return True

    def discard(self, job: Job) -> bool:
        """Take a cancelled job out before any worker sees it."""
        with self._ready:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def position_of(self, job: Job) -> int | None:
        """How many requests wait ahead of ``job``; None once it has left the queue."""
        with self._ready:
            ahead: set[int] = set()
            for queued in self._jobs:
                if queued is job:
                    return len(ahead)
                ahead.add(id(queued.whole))
            return None

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take_batch(self, limits: BatchLimits) -> list[Job]:
        """Block until a job is there, then return it with compatible jobs (up to the limits).

        The engine splits requests so that every job fits the limits on its own, except a
        single image larger than ``max_pixels``: that one runs alone, with no company.
        """
        with self._ready:
            first = self._take_first()
            batch = [first]
            items, pixels = first.work.n, first.work.pixels
            deadline = time.monotonic() + limits.wait_s
            while items < limits.max_items and pixels < limits.max_pixels:
                for job in list(self._jobs):
                    if job.cancelled:
                        self._jobs.remove(job)
                        continue
                    fits = items + job.work.n <= limits.max_items and pixels + job.work.pixels <= limits.max_pixels
                    if fits and job.key == first.key:
                        self._jobs.remove(job)
                        batch.append(job)
                        items += job.work.n
                        pixels += job.work.pixels
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def _take_first(self) -> Job:
        while True:
            while not self._jobs:
                if self._closed:
                    raise QueueClosed
                self._ready.wait()
            job = self._jobs.popleft()
            if not job.cancelled:
                return job

    def drain(self) -> list[Job]:
        with self._ready:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs
