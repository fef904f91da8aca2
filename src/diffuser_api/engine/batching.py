"""The shared job queue and the rule that groups compatible jobs into one pipeline call."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from diffuser_api.domain import ImageJob
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
    """

    def __init__(self, max_jobs: int) -> None:
        self._max_jobs = max_jobs
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.arrivals = 0  # jobs ever offered: a worker compares it to see if others came meanwhile

    def __len__(self) -> int:
        return len(self._jobs)

    def offer(self, job: Job) -> bool:
        """Add a job unless the queue is full or closed; never blocks.

        Wakes every waiting worker: a single wake-up may reach a worker gathering a batch the
        job cannot join, which ignores it while an idle worker sleeps on.
        """
        with self._ready:
            if self._closed or len(self._jobs) >= self._max_jobs:
                return False
            self._jobs.append(job)
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

    def position_of(self, work: ImageJob) -> int | None:
        with self._ready:
            return next((index for index, job in enumerate(self._jobs) if job.work is work), None)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take_batch(self, key_of: Callable[[Job], Hashable], limits: BatchLimits) -> list[Job]:
        """Block until a job is there, then return it with compatible jobs (up to the limits)."""
        with self._ready:
            first = self._take_first()
            batch = [first]
            key = key_of(first)
            items, pixels = first.work.n, first.work.pixels
            deadline = time.monotonic() + limits.wait_s
            while items < limits.max_items:
                for job in list(self._jobs):
                    if job.cancelled:
                        self._jobs.remove(job)
                        continue
                    fits = items + job.work.n <= limits.max_items and pixels + job.work.pixels <= limits.max_pixels
                    if fits and key_of(job) == key:
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
