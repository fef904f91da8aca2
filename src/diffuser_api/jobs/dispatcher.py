"""Runs stored jobs: claims them from the database, feeds each model's engine a bounded
number, renews their leases, and records how each ended.

Waiting jobs live in the database, not in the engine's bounded queue: the engine of a model
gets at most ``max_batch_size x workers x FEED_FACTOR`` jobs at once, enough to fill its
batches, while interactive requests keep their room in the queue.

The database is the jobs' cost beside the pipeline, on the same cores: so claims are made a
batch at a time (not one job per finished job), the jobs that end together are recorded in one
transaction, and the upkeep (leases, progress, lapsed leases, counts) runs once per poll
interval, not on every wake-up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffuser_api.config import Settings
from diffuser_api.domain import GeneratedImage, ImageRequest, StepProgress
from diffuser_api.engine.priority import Priority
from diffuser_api.errors import DiffuserError
from diffuser_api.jobs.coalesced import CoalescedWrites
from diffuser_api.jobs.live import LiveJob, LiveJobs
from diffuser_api.jobs.outcomes import AfterFailure, after_failure, cancelled_error, error_of
from diffuser_api.jobs.records import JobRecord, JobStatus
from diffuser_api.jobs.requests import as_checked, restore_request
from diffuser_api.jobs.store import JobStore, Outcome
from diffuser_api.models.registry import ModelRegistry, ServedModel
from diffuser_api.service.encoding import encode_image
from diffuser_api.service.images import ImageService
from diffuser_api.service.storage import ImageStorage
from diffuser_api.service.streaming import PartialImage, Step
from diffuser_api.service.validation import output_format_of

logger = logging.getLogger(__name__)

FEED_FACTOR = 2
# The jobs of one pipeline call end within a few ms of each other (their images are stored one
# after another on the background codec threads, and encoded there too unless the model's CPU
# worker already encoded them). The first outcome waits for the others that already left the
# engine, up to this long, so they commit as one transaction: 559 batch lines took 312
# transactions without it, 76 with it. A job that ends alone does not wait.
FINISH_LINGER_S = 0.05
# Finished jobs are checked for expiry this often (seconds); expired ones keep answering 410
# for one more time to live, then are deleted.
EXPIRY_INTERVAL_S = 10.0

FinalHook = Callable[[JobRecord], Awaitable[None]]
FinalObserver = Callable[[JobRecord], None]
# Counts a batch line's images against its caller's rate limit as it is about to run:
# (rate-limit identity, images) -> None once counted, or the seconds until the window has room.
# It raises a DiffuserError for a line that can never fit (more images than the limit allows).
ChargeImages = Callable[[str, int], Awaitable[float | None]]


@dataclass(eq=False)
class RunningJob:
    record: JobRecord
    live: LiveJob
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    # The latest step, written to the database at the next poll (None: already written).
    unsaved: tuple[int, int, int] | None = None
    partials: dict[int, int] = field(default_factory=dict)
    # Its input images (edits), read with the others claimed at the same time.
    inputs: list[tuple[str, bytes]] = field(default_factory=list)
    # Out of the engine, its images being stored: its outcome is about to be written.
    storing: bool = False
    started: float = field(default_factory=time.monotonic)


class JobDispatcher:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        registry: ModelRegistry,
        images: ImageService,
        storage: ImageStorage,
        live: LiveJobs,
        *,
        single_process: bool,
        on_final: FinalHook | None = None,
        observers: Sequence[FinalObserver] = (),
        charge: ChargeImages | None = None,
    ) -> None:
        """``single_process`` (SQLite): no other replica can hold a job, so jobs left
        ``in_progress`` by a crash are taken back at start at once, not after their lease.
        ``on_final`` (a webhook) and ``observers`` (metrics) hear of every final status.
        ``charge`` counts batch lines against their caller's image limit as they run (async
        jobs were counted at submission)."""
        self._settings = settings
        self._store = store
        self._registry = registry
        self._images = images
        self._storage = storage
        self._live = live
        self._single_process = single_process
        self._on_final = on_final
        self._observers = observers
        self._charge = charge
        self.replica = secrets.token_hex(8)
        self._running: dict[str, RunningJob] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._next_expiry = 0.0
        self._next_upkeep = 0.0
        self._finishes = CoalescedWrites(self._write_finishes, linger_s=FINISH_LINGER_S, settled=self._none_storing)
        # Jobs by status as of the last poll, for /metrics: a scrape never waits on the database.
        self.counts: dict[str, int] = {}

    def wake(self) -> None:
        """A job was just stored: claim it now rather than at the next poll."""
        self._wake.set()

    def runs_here(self, job_id: str) -> bool:
        return job_id in self._running

    def runs_other_lines(self, line: JobRecord) -> bool:
        """Another line of ``line``'s batch is still running here: it will end later, so the
        batch cannot be complete yet (no need to ask the database)."""
        return any(running.record.batch_id == line.batch_id and running.record.id != line.id
                   for running in self._running.values())

    def stop_here(self, job_id: str) -> None:
        """Its cancel was asked for (and stored): if it runs in this process, stop it now
        rather than at the next upkeep."""
        running = self._running.get(job_id)
        if running is not None and running.task is not None and not running.cancel_requested:
            running.cancel_requested = True
            # Queued behind the task's first step (``call_soon`` is first in, first out), never
            # before it: a task cancelled before it starts never enters ``_run``, not even its
            # ``finally``, and its job would stay in progress with its lease renewed forever.
            asyncio.get_running_loop().call_soon(running.task.cancel)

    async def run_forever(self) -> None:
        if self._single_process:
            requeued, failed = await asyncio.to_thread(self._reclaim, math.inf)
            if requeued or failed:
                logger.info("jobs left running by the last process: %d queued again, %d failed (attempts spent)",
                            len(requeued), len(failed))
        while not self._stopping:
            try:
                await self._tick()
            except DiffuserError as error:  # never for long: the next poll tries again
                logger.warning("the jobs database could not be read: %s", error.message)
            except Exception:  # a database hiccup must not stop jobs for the rest of the server's life
                logger.exception("polling the jobs database failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.job_poll_s)
            self._wake.clear()

    def stop_claiming(self) -> None:
        """Shutdown begins: the poll loop ends after its current poll (``run_forever`` returns)."""
        self._stopping = True
        self._wake.set()

    async def stop(self) -> None:
        """Shutdown: nothing new is claimed, and running jobs go back to the queue (not failed)
        for the next start or another replica. Call once ``run_forever`` has returned, so no
        claim is still on its way."""
        self.stop_claiming()
        tasks = [running.task for running in self._running.values() if running.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A task cancelled before its first step never entered ``_run`` (nor its ``finally``):
        # its job is given back here, or it would stay in progress until its lease lapsed.
        for running in list(self._running.values()):
            await self._requeue(running, AfterFailure.REQUEUE, "the server stopped before it began")
            self._forget(running.record.id)

    # -- one poll --------------------------------------------------------------------------

    async def _tick(self) -> None:
        now = time.time()
        if now >= self._next_upkeep:  # once per poll interval, however often it is woken
            self._next_upkeep = now + self._settings.job_poll_s
            await self._upkeep(now)
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_INTERVAL_S
            await self._expire(now)
        if self._stopping or self._registry.draining:
            return  # shutdown has begun: what is queued stays queued for the next start
        for model in list(self._registry):
            room = self._room(model)
            if room < model.spec.engine.max_batch_size and self._running_on(model):
                continue  # claim a batch's worth at once, not one job per finished one
            claimed = await asyncio.to_thread(
                self._store.claim, model.id, room, self.replica, time.time(), self._settings.job_lease_s
            )
            if not claimed:
                continue
            inputs = await asyncio.to_thread(self._store.inputs_of, [record.id for record in claimed])
            for record in claimed:
                if self._stopping:  # shutdown began during the claim: give the job back untouched
                    await asyncio.to_thread(self._store.requeue, record.id, self.replica, count_attempt=False)
                else:
                    self._start(record, inputs.get(record.id, []))

    async def _upkeep(self, now: float) -> None:
        """Leases renewed (and cancels asked for on other replicas seen), progress saved,
        lapsed leases taken back, the counts for /metrics refreshed."""
        await self._renew(now)
        await self._save_progress()
        _, failed = await asyncio.to_thread(self._reclaim, now)
        for record in failed:
            await self.announce(record)
        self.counts = await asyncio.to_thread(self._store.counts_by_status)

    def _room(self, model: ServedModel) -> int:
        engine = model.engine_now
        workers = len(engine.workers) if engine is not None else len(model.devices) or 1
        return model.spec.engine.max_batch_size * workers * FEED_FACTOR - self._running_on(model)

    def _running_on(self, model: ServedModel) -> int:
        return sum(1 for running in self._running.values() if running.record.model == model.id)

    def _reclaim(self, now: float) -> tuple[list[str], list[JobRecord]]:
        return self._store.reclaim_lapsed(now, self._settings.job_max_attempts, self._settings.job_ttl_s)

    async def _expire(self, now: float) -> None:
        expired = await asyncio.to_thread(self._store.expire, now)
        for record in expired:
            await asyncio.to_thread(self._storage.delete, record.image_names)
            await self.announce(dataclasses.replace(record, status=JobStatus.EXPIRED, result=None))
        purged = await asyncio.to_thread(self._store.purge, now - self._settings.job_ttl_s)
        if expired or purged:
            logger.info("jobs: %d expired (images deleted), %d expired records deleted", len(expired), purged)

    async def _renew(self, now: float) -> None:
        if not self._running:
            return
        stop = await asyncio.to_thread(
            self._store.renew, list(self._running), self.replica, now + self._settings.job_lease_s
        )
        for job_id in stop:
            self.stop_here(job_id)

    async def _save_progress(self) -> None:
        for job_id, running in list(self._running.items()):
            if running.unsaved is not None:
                step, total, image_index = running.unsaved
                running.unsaved = None
                await asyncio.to_thread(self._store.save_progress, job_id, self.replica, step, total, image_index)

    # -- one job ---------------------------------------------------------------------------

    def _start(self, record: JobRecord, inputs: list[tuple[str, bytes]]) -> None:
        running = RunningJob(record, self._live.open(record.id), inputs=inputs)
        self._running[record.id] = running
        running.task = asyncio.create_task(self._run(running), name=f"job {record.id}")

    async def _run(self, running: RunningJob) -> None:
        record = running.record
        # One INFO line per attempt, when it ends (a batch of 50,000 lines logs 50,000 lines).
        logger.debug("job %s (request %s): attempt %d on %s", record.id, record.request_id, record.attempts,
                     record.model)
        try:
            try:
                wait_s = await self._charge_line(record)
                if wait_s is not None:
                    await self._defer(running, wait_s)
                    return
                result = await self._attempt(running)
            except asyncio.CancelledError:
                if not running.cancel_requested:  # shutdown
                    await self._requeue(running, AfterFailure.REQUEUE, "the server is stopping")
                    return
                await self._finish(running, JobStatus.CANCELLED, error=cancelled_error())
            except Exception as error:
                if not isinstance(error, DiffuserError):
                    logger.exception("job %s (request %s) failed unexpectedly", record.id, record.request_id)
                decision = after_failure(error, record.attempts, self._settings.job_max_attempts,
                                         self._stopping or self._registry.draining)
                if decision is AfterFailure.FAIL:
                    await self._finish(running, JobStatus.FAILED, error=error_of(error))
                else:
                    # Not claimed again before the next poll: a full engine queue gets time to drain.
                    await self._requeue(running, decision, getattr(error, "message", type(error).__name__))
                    return
            else:
                await self._finish(running, JobStatus.COMPLETED, result=result)
            self._wake.set()  # room for the next job
        finally:
            self._forget(record.id)

    def _forget(self, job_id: str) -> None:
        """The job no longer runs here: its followers' stream ends."""
        self._running.pop(job_id, None)
        self._live.close(job_id)

    async def _charge_line(self, record: JobRecord) -> float | None:
        """A batch line's images count against its caller's limit when it runs, not when the
        batch is submitted; None: counted (or nothing to count), else seconds to wait."""
        if self._charge is None or record.charge_to is None:
            return None
        return await self._charge(record.charge_to, int(record.request.get("n") or 1))

    async def _defer(self, running: RunningJob, wait_s: float) -> None:
        """Not failed: back to the queue until its caller's window has room. Other lines are
        claimed at once in its place."""
        record = running.record
        await asyncio.shield(asyncio.to_thread(self._store.defer, record.id, self.replica, time.time() + wait_s))
        logger.info("batch line %s (request %s) waits %.1f s for its caller's image rate limit", record.id,
                    record.request_id, wait_s)
        self._wake.set()

    async def _attempt(self, running: RunningJob) -> dict[str, Any]:
        record = running.record
        request = restore_request(record.endpoint, record.request, running.inputs)
        model = self._registry.get(record.model)
        # A preset's name stays in the stored request: its LoRAs and defaults apply on every attempt.
        preset = self._registry.route(request.model).preset
        work = await self._images.prepare(as_checked(request), model, preset=preset)
        work = dataclasses.replace(work, partial_images=request.partial_images or 0)
        # One attempt's time: the load, the engine's queue and the steps (not the wait in the
        # database, and not request_timeout_s).
        deadline = time.monotonic() + self._settings.job_timeout_s
        async with self._registry.lease(model, deadline=deadline) as engine:
            # The one place jobs enter an engine (where their priority class is given).
            priority = Priority.BATCH if record.batch_id is not None else Priority.JOB
            # Images encoded on the worker where the service says so; previews stay images,
            # encoded only while somebody follows the job's events (``_publish_preview``).
            encoders = self._images.worker_encoders(model, request, previews=False)
            # A batch line's steps go nowhere (nobody can follow a line, its progress is not
            # saved): none of them crosses from the worker thread to the event loop.
            progress = self._progress_sink(running, request) if record.batch_id is None else None
            generated = await engine.submit(work, progress, deadline=deadline, priority=priority,
                                            encoders=encoders)
        running.storing = True
        try:
            names = await asyncio.gather(*(self._images.background_codec.run_admitted(self._save, image, request)
                                           for image in generated))
        finally:
            running.storing = False
        return {
            "created": int(time.time()),
            "output_format": output_format_of(request),
            "size": f"{work.width}x{work.height}",
            "quality": request.quality,
            "prompt_tokens": generated[0].prompt_tokens if generated else None,
            "images": [{"name": name, "seed": image.seed, "revised_prompt": image.revised_prompt}
                       for name, image in zip(names, generated, strict=True)],
        }

    def _progress_sink(self, running: RunningJob, request: ImageRequest) -> Callable[[StepProgress], None]:
        def report(progress: StepProgress) -> None:
            running.unsaved = (progress.step, progress.total, progress.first_image)
            running.live.publish(Step(progress.step, progress.total))
            if progress.previews and running.live.followed:
                for index, preview in enumerate(progress.previews, start=progress.first_image):
                    count = running.partials.get(index, 0)
                    running.partials[index] = count + 1
                    asyncio.ensure_future(self._publish_preview(running.live, preview, request, index, count))

        return report

    async def _publish_preview(self, live: LiveJob, preview: Any, request: ImageRequest, index: int,
                               count: int) -> None:
        encode = functools.partial(encode_image, quick=True)
        data = await self._images.codec.run_admitted(encode, preview, output_format_of(request),
                                                     request.output_compression)
        live.publish(PartialImage(index, count, base64.b64encode(data).decode("ascii")))

    def _save(self, image: GeneratedImage, request: ImageRequest) -> str:
        return self._storage.save(self._images.encoded(image, request), output_format_of(request))

    async def _requeue(self, running: RunningJob, decision: AfterFailure, reason: str) -> None:
        record = running.record
        count = decision is AfterFailure.RETRY
        await asyncio.shield(asyncio.to_thread(self._store.requeue, record.id, self.replica, count_attempt=count))
        logger.info("job %s (request %s) queued again after %.2f s (%s)", record.id, record.request_id,
                    time.monotonic() - running.started, reason)

    async def _finish(self, running: RunningJob, status: JobStatus, *, result: dict[str, Any] | None = None,
                      error: dict[str, Any] | None = None) -> None:
        record = running.record
        finished = await self._finishes.write(Outcome(record.id, status, result, error))
        if finished is None:  # another replica took it over after our lease lapsed
            if result is not None:
                await asyncio.to_thread(self._storage.delete, [image["name"] for image in result["images"]])
            logger.warning("job %s (request %s) was taken over by another replica; this run's outcome is dropped",
                           record.id, record.request_id)
            return
        logger.info("job %s (request %s) %s after %d attempt(s), this one %.2f s", record.id, record.request_id,
                    status.value, finished.attempts, time.monotonic() - running.started)
        # No longer running once recorded: the observers (the batch service asks whether other
        # lines of its batch still run here) must not count it, even while a webhook is awaited.
        self._running.pop(record.id, None)
        await self.announce(finished)

    def _none_storing(self) -> bool:
        return not any(running.storing for running in self._running.values())

    def _write_finishes(self, outcomes: Sequence[Outcome]) -> list[JobRecord | None]:
        return self._store.finish(outcomes, self.replica, time.time(), self._settings.job_ttl_s)

    async def announce(self, record: JobRecord) -> None:
        for observe in self._observers:
            observe(record)
        if self._on_final is not None:
            await self._on_final(record)
