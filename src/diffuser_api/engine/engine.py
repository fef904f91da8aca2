"""The event loop's side of the engine: submit a job, await its future, cancel it."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from diffuser_api.domain import GeneratedImage, ImageJob
from diffuser_api.engine.batching import BatchLimits, JobQueue
from diffuser_api.engine.job import Job, JobTiming, ProgressSink
from diffuser_api.engine.runner import ModelRunner
from diffuser_api.engine.worker import BatchObserver, BatchReport, Worker
from diffuser_api.errors import Overloaded, RequestTimeout, Unavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_queue_size: int = 64
    max_batch_size: int = 8
    max_batch_pixels: int = 8 * 1024 * 1024
    batch_wait_s: float = 0.005
    request_timeout_s: float = 300.0


class Engine:
    """Owns one model's queue and its workers (one per device or model copy)."""

    def __init__(
        self, runners: Sequence[ModelRunner], limits: EngineLimits, observers: Sequence[BatchObserver] = ()
    ) -> None:
        """``observers`` (e.g. metrics) hear of every finished batch; the sequence is read at each
        batch, so observers added to it later are heard too."""
        self.limits = limits
        self._queue = JobQueue(limits.max_queue_size)
        batch_limits = BatchLimits(limits.max_batch_size, limits.max_batch_pixels, limits.batch_wait_s)
        self._observers = observers
        self.workers = [Worker(runner, self._queue, batch_limits, self._notify) for runner in runners]
        self._recent_compute_s: deque[float] = deque(maxlen=20)
        self._accepting = True

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(
        self, work: ImageJob, progress: ProgressSink | None = None, timing: JobTiming | None = None
    ) -> list[GeneratedImage]:
        """Queue the work and wait for its images.

        Cancelling the awaiting task (client gone) cancels the job: a queued job never runs,
        a running one stops at the next step once no client of its batch is left. ``timing``,
        if given, gets the job's queue wait and compute time however it ends.
        """
        if not self._accepting:
            raise Unavailable("the server is shutting down", retry_after=1.0)
        loop = asyncio.get_running_loop()
        job = Job(work=work, loop=loop, future=loop.create_future(), progress=progress)
        if not self._queue.offer(job):
            raise Overloaded(
                f"the queue is full ({self.limits.max_queue_size} requests waiting); retry later",
                retry_after=self.retry_after_s(),
            )
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.limits.request_timeout_s)
        except TimeoutError:
            self._cancel(job)
            raise RequestTimeout(
                f"the request did not finish within {self.limits.request_timeout_s:g} s", code="timeout"
            ) from None
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        finally:
            if timing is not None:
                timing.record(job, time.monotonic())

    def queue_position(self, work: ImageJob) -> int | None:
        """0 for the next job to run; None once a worker has taken it."""
        return self._queue.position_of(work)

    def retry_after_s(self) -> float:
        """Estimate when a slot frees up: queued batches times the recent time per batch."""
        per_batch = statistics.median(self._recent_compute_s) if self._recent_compute_s else 1.0
        batches_ahead = max(1, len(self._queue)) / max(1, self.limits.max_batch_size * len(self.workers))
        return max(1.0, round(per_batch * batches_ahead, 1))

    def _cancel(self, job: Job) -> None:
        job.cancel()
        job.future.cancel()  # nobody awaits it any more; a late result is dropped
        self._queue.discard(job)

    def _record(self, report: BatchReport) -> None:
        if report.outcome == "ok":
            self._recent_compute_s.append(report.compute_s)
        logger.debug(
            "batch on %s: %d images, %.3f s compute, %d steps, %s",
            report.worker, report.size, report.compute_s, report.steps, report.outcome,
        )

    def _notify(self, report: BatchReport) -> None:
        self._record(report)
        for observe in self._observers:
            observe(report)

    async def stop(self, grace_s: float) -> None:
        """Stop taking work, let workers finish what is queued (bounded), then fail the rest."""
        self._accepting = False
        self._queue.close()
        await asyncio.to_thread(self._join_workers, grace_s)
        for job in self._queue.drain():
            job.fail(Unavailable("the server shut down before this request ran"))

    def _join_workers(self, grace_s: float) -> None:
        """Share one deadline, so stopping N busy workers takes grace_s, not N times it."""
        deadline = time.monotonic() + grace_s
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
