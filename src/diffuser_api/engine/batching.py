"""The shared job queue and the rule that groups compatible jobs into one pipeline call."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from diffuser_api.engine.job import Job
from diffuser_api.engine.priority import Priority, effective_class

# Interactive traffic counts as live for this long after its last request arrived: its clients
# are reading answers and sending their next requests in between.
INTERACTIVE_LIVE_S = 1.0


@dataclass(frozen=True)
class BatchLimits:
    """``background_items``: the most images in a batch of async jobs or batch lines while
    interactive traffic is live. An interactive request that arrives just after such a batch
    started waits for all of it (a call costs about its image count), so smaller background
    batches keep interactive latency close to what it is without jobs; with no interactive
    traffic the background fills ``max_items`` again."""

    max_items: int
    max_pixels: int
    wait_s: float
    background_items: int | None = None


class QueueClosed(Exception):
    """The engine is stopping; no more jobs will come out."""


class JobQueue:
    """A queue that workers take *batches* from, in order of priority class with ageing.

    One queue serves every worker of a model, so an idle device takes the next job rather than
    waiting behind a busy one. Jobs are served by effective class (``engine.priority``: the
    class, improved by one per ``ageing_s`` waited), then oldest first. A batch starts with the
    first job in that order and gathers compatible jobs (same batch key) in the same order, of
    the first one's effective class or a better one: a pipeline call costs about its image
    count (on a CPU, and at large sizes on a GPU), so a job in an interactive batch would make
    the interactive request wait for the job's pixels. An incompatible job is never starved by
    ones that arrive after it in its class.

    Only interactive requests count against ``max_requests``: their clients hold a connection
    open and must hear 429 at once. Jobs and batch lines are always taken; their feeders bound
    how many they put in (the rest wait in the database).

    A request too large for one batch comes as several jobs (its chunks); the bound counts
    requests, so a large request is never refused by a queue that has room for it.
    """

    def __init__(self, max_requests: int, ageing_s: float) -> None:
        self._max_requests = max_requests
        self._ageing_s = ageing_s
        self._jobs: deque[Job] = deque()  # in arrival order
        self._ready = threading.Condition()
        self._closed = False
        self.arrivals = 0  # requests ever offered: a worker compares it to see if others came meanwhile
        self._interactive_at = -math.inf  # when the last interactive request arrived (monotonic)

    def __len__(self) -> int:
        """Requests waiting, every class (a split request counts once)."""
        with self._ready:
            return len({id(job.whole) for job in self._jobs})

    def waiting(self, priority: Priority) -> int:
        """Requests of ``priority`` (their own class, not the aged one) waiting."""
        with self._ready:
            return self._requests_of(priority)

    @property
    def full(self) -> bool:
        """No room for another interactive request."""
        with self._ready:
            return self._interactive_full()

    def offer(self, jobs: Sequence[Job]) -> bool:
        """Add one request's jobs, all or none, unless the queue is closed or (interactive
        requests only) full; never blocks.

        Wakes every waiting worker: a single wake-up may reach a worker gathering a batch the
        job cannot join, which ignores it while an idle worker sleeps on.
        """
        with self._ready:
            if self._closed or (jobs[0].priority == Priority.INTERACTIVE and self._interactive_full()):
                return False
            self._jobs.extend(jobs)
            self.arrivals += 1
            if jobs[0].priority == Priority.INTERACTIVE:
                self._interactive_at = time.monotonic()
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
        """How many requests wait ahead of ``job`` in the order they will be served now; None
        once it has left the queue. A job's position may grow: a new interactive request goes
        ahead of a job that has not aged to its class."""
        with self._ready:
            ahead: set[int] = set()
            for queued in self._in_order():
                if queued is job:
                    return len(ahead)
                ahead.add(id(queued.whole))
            return None

    def class_of(self, job: Job, now: float) -> int:
        """``job``'s effective class at ``now`` (its class, aged)."""
        return effective_class(job.priority, now - job.enqueued_at, self._ageing_s)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take_batch(self, limits: BatchLimits) -> list[Job]:
        """Block until a job is there, then return the first in serving order with compatible
        jobs (up to the limits), these too in serving order.

        The engine splits requests so that every job fits the limits on its own, except a
        single image larger than ``max_pixels``: that one runs alone, with no company.
        """
        with self._ready:
            first = self._take_first()
            batch = [first]
            items, pixels = first.work.n, first.work.pixels
            deadline = time.monotonic() + limits.wait_s
            lowest = self.class_of(first, time.monotonic())
            max_items = self._items_for(first, limits)
            while items < max_items and pixels < limits.max_pixels:
                now = time.monotonic()
                for job in self._in_order():
                    fits = items + job.work.n <= max_items and pixels + job.work.pixels <= limits.max_pixels
                    if fits and job.key == first.key and self.class_of(job, now) <= lowest:
                        self._jobs.remove(job)
                        batch.append(job)
                        items += job.work.n
                        pixels += job.work.pixels
                remaining = deadline - time.monotonic()
                # A batch filled from the queue starts now: waiting would only delay it (it was
                # a few milliseconds per call under load, until the next arrival woke the wait).
                full = items >= max_items or pixels >= limits.max_pixels
                if full or remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def _items_for(self, first: Job, limits: BatchLimits) -> int:
        """A batch led by background work (its own class, aged or not) is kept to
        ``background_items`` while interactive traffic is live. Call under the lock."""
        background = first.priority != Priority.INTERACTIVE and limits.background_items is not None
        if background and time.monotonic() - self._interactive_at < INTERACTIVE_LIVE_S:
            return min(limits.max_items, limits.background_items)
        return limits.max_items

    def _take_first(self) -> Job:
        while True:
            queued = self._in_order()
            if queued:
                self._jobs.remove(queued[0])
                return queued[0]
            if self._closed:
                raise QueueClosed
            self._ready.wait()

    def _in_order(self) -> list[Job]:
        """Waiting jobs in serving order: effective class, then arrival (the sort is stable).
        Cancelled jobs are dropped on the way: no worker should see them. Call under the lock."""
        for job in [job for job in self._jobs if job.cancelled]:
            self._jobs.remove(job)
        now = time.monotonic()
        return sorted(self._jobs, key=lambda job: self.class_of(job, now))

    def _interactive_full(self) -> bool:
        return self._requests_of(Priority.INTERACTIVE) >= self._max_requests

    def _requests_of(self, priority: Priority) -> int:
        return len({id(job.whole) for job in self._jobs if job.priority == priority})

    def drain(self) -> list[Job]:
        with self._ready:
            jobs = list(self._jobs)
            self._jobs.clear()
            return jobs
