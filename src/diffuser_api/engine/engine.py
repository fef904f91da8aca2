"""The event loop's side of the engine: submit a job, await its future, cancel it."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from diffuser_api.domain import GeneratedImage, ImageJob
from diffuser_api.engine.batching import BatchLimits, JobQueue
from diffuser_api.engine.device_turns import DeviceTurns, device_of
from diffuser_api.engine.job import Job, JobTiming, ProgressSink, WorkerEncoders
from diffuser_api.engine.priority import Priority
from diffuser_api.engine.runner import ModelRunner
from diffuser_api.engine.splitting import SplitProgress, split_work
from diffuser_api.engine.worker import BatchObserver, BatchReport, DeviceTurn, Worker, encoding_threads, no_turn
from diffuser_api.errors import DiffuserError, Overloaded, RequestTimeout, Unavailable

logger = logging.getLogger(__name__)

# A server shutting down will not serve the retry itself; another replica (or this one,
# restarted) may, so clients are told to come back soon.
SHUTDOWN_RETRY_AFTER_S = 1.0
# Worker threads that die this many times with no successful batch in between make the model
# unhealthy (/health 503): a replacement is still started each time, but an orchestrator
# should restart the process.
MAX_DEATHS_IN_A_ROW = 3


@dataclass(frozen=True)
class EngineLimits:
    max_queue_size: int = 64
    max_batch_size: int = 8
    max_batch_pixels: int = 8 * 1024 * 1024
    batch_wait_s: float = 0.005
    request_timeout_s: float = 300.0
    priority_ageing_s: float = 30.0


class Engine:
    """Owns one model's queue and its workers (one per device or model copy)."""

    def __init__(
        self,
        runners: Sequence[ModelRunner],
        limits: EngineLimits,
        observers: Sequence[BatchObserver] = (),
        turns: DeviceTurns | None = None,
    ) -> None:
        """``observers`` (e.g. metrics) hear of every finished batch; the sequence is read at each
        batch, so observers added to it later are heard too. ``turns``, shared with the engines
        of other models, keeps them from running batches on one device at the same time."""
        self.limits = limits
        self._turns = turns
        self._queue = JobQueue(limits.max_queue_size, limits.priority_ageing_s)
        self._batch_limits = BatchLimits(limits.max_batch_size, limits.max_batch_pixels, limits.batch_wait_s,
                                         background_items=max(1, limits.max_batch_size // 2))
        self._observers = observers
        # Every runner of a model groups jobs the same way (one family), so one key serves all.
        self._key_of = runners[0].batch_key
        self._encoding_threads = encoding_threads(len(runners))
        self.workers = [self._new_worker(runner) for runner in runners]
        self._recent_compute_s: deque[float] = deque(maxlen=20)
        self._submitted: dict[int, tuple[Job, ...]] = {}  # id(work) -> its jobs, while awaited
        self._stop_deadline: float | None = None
        self._cutoff: asyncio.TimerHandle | None = None
        self._deaths_in_a_row = 0

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting, every class."""
        return len(self._queue)

    def waiting(self, priority: Priority) -> int:
        """Requests of one class waiting: what a feeder of jobs or batch lines watches to keep
        only a few of its own in the queue (the rest wait in its database)."""
        return self._queue.waiting(priority)

    @property
    def health_problem(self) -> str | None:
        """Why this model should not be called healthy, or None."""
        if self._deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            return f"its worker died {self._deaths_in_a_row} times in a row"
        if self._stop_deadline is None and not any(worker.alive for worker in self.workers):
            return "no worker is running"
        return None

    async def submit(
        self,
        work: ImageJob,
        progress: ProgressSink | None = None,
        timing: JobTiming | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        encoders: WorkerEncoders | None = None,
    ) -> list[GeneratedImage]:
        """Queue the work and wait for its images, until ``deadline`` (``time.monotonic``; by
        default ``request_timeout_s`` from now for an interactive request, none for the other
        classes: jobs may wait for hours, and their feeder bounds an attempt itself; a caller
        that waited for the model to load passes the request's own, so the wait counts against it).

        ``priority`` places it in the queue (see ``engine.priority``); only interactive requests
        are refused by a full queue.

        Work larger than one batch runs as several (its images come back in seed order).
        Cancelling the awaiting task (client gone) cancels the job: a queued job never runs,
        a running one stops at the next step once no client of its batch is left. ``timing``,
        if given, gets the job's queue wait and compute time however it ends. ``encoders``,
        if given, encode its previews and images on the worker's thread (see ``WorkerEncoders``).
        """
        self.check_room(priority)
        jobs = self._jobs_of(work, progress, priority, encoders)
        if not self._queue.offer(jobs):
            raise self._overloaded()
        self._submitted[id(work)] = jobs
        try:
            if deadline is None and priority == Priority.INTERACTIVE:
                deadline = time.monotonic() + self.limits.request_timeout_s
            images = await self._results(jobs, deadline)
            if images is None:
                raise self._timed_out(jobs)
            return images
        finally:
            del self._submitted[id(work)]
            for job in jobs:
                if not job.future.done():  # timed out, cancelled, or a sibling chunk failed
                    self._cancel(job)
            if timing is not None:
                timing.record(jobs, time.monotonic())

    def check_room(self, priority: Priority = Priority.INTERACTIVE) -> None:
        """Raise now what ``submit`` would for a full queue or a stopping engine, so a stream can
        still answer with a plain 429 or 503 before its 200 (``submit`` decides in the end: a
        request may lose the race for the last place). Only interactive requests meet a full queue."""
        if self._stop_deadline is not None:
            raise Unavailable("the server is shutting down", retry_after=SHUTDOWN_RETRY_AFTER_S)
        if priority == Priority.INTERACTIVE and self._queue.full:
            raise self._overloaded()

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"the queue is full ({self.limits.max_queue_size} requests waiting); retry later",
            retry_after=self.retry_after_s(),
        )

    def _jobs_of(self, work: ImageJob, progress: ProgressSink | None, priority: Priority,
                 encoders: WorkerEncoders | None) -> tuple[Job, ...]:
        loop = asyncio.get_running_loop()
        enqueued_at = time.monotonic()  # one for all chunks: they age together
        chunks = split_work(work, self.limits.max_batch_size, self.limits.max_batch_pixels)
        split_progress = SplitProgress(progress, chunks) if progress is not None else None
        cancel_flag = threading.Event()
        return tuple(
            Job(
                work=chunk,
                whole=work,
                key=self._key_of(chunk),
                loop=loop,
                future=loop.create_future(),
                progress=split_progress.of_chunk(index) if split_progress is not None else None,
                encoders=encoders,
                cancel_flag=cancel_flag,
                priority=priority,
                enqueued_at=enqueued_at,
            )
            for index, chunk in enumerate(chunks)
        )

    async def _results(self, jobs: Sequence[Job], deadline: float | None) -> list[GeneratedImage] | None:
        """Every chunk's images in order, or None at the deadline (if any); the first failure of
        any chunk fails the request."""
        futures = [job.future for job in jobs]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for future in futures:
            if future.done() and (error := future.exception()) is not None:
                raise error
        if pending:
            return None
        return [image for future in futures for image in future.result()]

    def _timed_out(self, jobs: Sequence[Job]) -> DiffuserError:
        """A request that never left the queue is a busy server (503, retry); one that ran
        past its deadline is too slow as asked (504: retrying would repeat the wait)."""
        timeout_s = self.limits.request_timeout_s
        if all(job.started_at is None for job in jobs):
            return Unavailable(
                f"the server is busy: the request waited {timeout_s:g} s in the queue without starting; retry later",
                retry_after=self.retry_after_s(),
            )
        return RequestTimeout(f"the request did not finish within {timeout_s:g} s", code="timeout")

    def queue_position(self, work: ImageJob) -> int | None:
        """Requests ahead of ``work`` (0: it runs next); None once a worker has taken any of it."""
        jobs = self._submitted.get(id(work))
        if jobs is None or any(job.started_at is not None for job in jobs):
            return None
        return self._queue.position_of(jobs[0])

    def retry_after_s(self) -> float:
        """Estimate when a slot frees up for an interactive request: the interactive batches
        queued times the recent time per batch (jobs wait behind them)."""
        per_batch = statistics.median(self._recent_compute_s) if self._recent_compute_s else 1.0
        interactive_ahead = self._queue.waiting(Priority.INTERACTIVE)
        batches_ahead = max(1, interactive_ahead) / max(1, self.limits.max_batch_size * len(self.workers))
        return max(1.0, round(per_batch * batches_ahead, 1))

    def _cancel(self, job: Job) -> None:
        job.cancel()
        job.future.cancel()  # nobody awaits it any more; a late result is dropped
        self._queue.discard(job)

    def _new_worker(self, runner: ModelRunner) -> Worker:
        return Worker(runner, self._queue, self._batch_limits, self._notify, self._replace, self._turn_on(runner),
                      self._encoding_threads)

    def _turn_on(self, runner: ModelRunner) -> DeviceTurn:
        if self._turns is None:
            return no_turn
        turns, device = self._turns, device_of(runner)
        return lambda batch: turns.turn(device, self, lambda: self._waiting_class(batch))

    def _waiting_class(self, batch: Sequence[Job]) -> int:
        """The best effective class in the batch a worker holds while it waits for the device.

        Only the held batch counts, not the queue behind it: the worker runs that batch first
        whatever it has queued, so ranking it by its queue would put a batch of batch lines
        ahead of another model's job batch and bring the queued request no sooner. A queued
        request reaches the device through a worker of its own model that takes it."""
        now = time.monotonic()
        return min(self._queue.class_of(job, now) for job in batch)

    def _replace(self, dead: Worker) -> None:
        """On the dead worker's thread: start another on its runner, so the queue is served."""
        self._deaths_in_a_row += 1
        if self._stop_deadline is not None:
            return
        replacement = self._new_worker(dead.runner)
        replacement.start()  # before it is listed: a stop joining the list meanwhile must find it started
        self.workers = [replacement if worker is dead else worker for worker in self.workers]
        logger.warning("started a new worker on %s", dead.runner.name)

    def _record(self, report: BatchReport) -> None:
        if report.outcome == "ok":
            self._recent_compute_s.append(report.compute_s)
            self._deaths_in_a_row = 0
        logger.debug(
            "batch on %s: %d images, %.3f s compute, %d steps, %s",
            report.worker, report.size, report.compute_s, report.steps, report.outcome,
        )

    def _notify(self, report: BatchReport) -> None:
        self._record(report)
        for observe in self._observers:
            observe(report)

    def drain(self, grace_s: float) -> None:
        """Shutdown begins: refuse new work and fail queued work at once (it never started, so
        the client should retry, elsewhere); running work has ``grace_s`` to finish, then fails
        too. Call on the event loop; later calls keep the first deadline."""
        if self._stop_deadline is not None:
            return
        self._stop_deadline = time.monotonic() + grace_s
        self._queue.close()
        for job in self._queue.drain():
            job.fail(Unavailable("the server is shutting down; this request had not started",
                                 retry_after=SHUTDOWN_RETRY_AFTER_S))
        self._cutoff = asyncio.get_running_loop().call_later(grace_s, self._fail_running)

    async def stop(self, grace_s: float) -> None:
        """Drain (unless already draining), wait for the workers until the drain's deadline,
        then fail whatever still runs. Stopping N busy workers takes grace_s, not N times it."""
        self.drain(grace_s)
        assert self._stop_deadline is not None
        await asyncio.to_thread(self._join_workers, self._stop_deadline)
        self._fail_running()

    def _fail_running(self) -> None:
        if self._cutoff is not None:
            self._cutoff.cancel()
        for jobs in list(self._submitted.values()):
            for job in jobs:
                if not job.future.done():
                    job.cancel()  # its batch stops at the next step once no job is left in it
                    job.fail(Unavailable("the server shut down before this request finished",
                                         retry_after=SHUTDOWN_RETRY_AFTER_S))

    def _join_workers(self, deadline: float) -> None:
        for worker in list(self.workers):
            worker.join(max(0.0, deadline - time.monotonic()))
