"""The async-jobs use cases the routes call: submit, read, list, cancel, delete, follow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from diffuser_api.config import Settings
from diffuser_api.domain import ImageRequest
from diffuser_api.errors import Conflict, Gone, InvalidRequest, NotFound, Overloaded
from diffuser_api.jobs.database import migrate, open_database
from diffuser_api.jobs.dispatcher import ChargeImages, FinalHook, FinalObserver, JobDispatcher
from diffuser_api.jobs.live import LiveEvent, LiveJobs
from diffuser_api.jobs.outcomes import cancelled_error
from diffuser_api.jobs.records import JobRecord, JobStatus, new_job_id
from diffuser_api.jobs.requests import as_checked, request_fields, request_inputs
from diffuser_api.jobs.store import JobStore
from diffuser_api.models.registry import ModelRegistry
from diffuser_api.service.images import Admission, ImageService
from diffuser_api.service.storage import ImageStorage

# The same Idempotency-Key from the same caller within this long returns the first job.
IDEMPOTENCY_WINDOW_S = 24 * 3600.0
# When a caller refused for too many pending jobs may try again.
JOBS_FULL_RETRY_AFTER_S = 30.0
# The folder (or prefix) under the image store where jobs' images live, with no time to live.
JOB_IMAGES = "jobs"


@dataclass(frozen=True)
class Submitted:
    job: JobRecord
    created: bool  # False: an earlier job with the same Idempotency-Key


@dataclass(frozen=True)
class JobState:
    """Where a job stands, as its events start and each time it changes."""

    job: JobRecord
    queue_position: int | None


JobEvent = JobState | LiveEvent


def job_storage(settings: Settings) -> ImageStorage:
    """Jobs' images outlive ``storage_ttl_s``: they go when their job expires or is deleted."""
    base = (settings.storage_url or str(settings.storage_dir)).rstrip("/")
    return ImageStorage(f"{base}/{JOB_IMAGES}", settings.storage_options, ttl_s=None,
                        presign=settings.storage_presign)


class JobService:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        images: ImageService,
        storage: ImageStorage,
        *,
        on_final: FinalHook | None = None,
        charge: ChargeImages | None = None,
    ) -> None:
        """``on_final`` hears of every final status (completed, failed, cancelled, expired),
        e.g. to send a webhook; ``charge`` counts batch lines against their caller's image
        rate limit as they run."""
        self._settings = settings
        self._registry = registry
        self._images = images
        self.storage = storage
        engine = open_database(settings)
        self._store = JobStore(engine)
        self._live = LiveJobs()
        self._observers: list[FinalObserver] = []
        self._dispatcher = JobDispatcher(
            settings, self._store, registry, images, storage, self._live,
            single_process=engine.dialect.name == "sqlite", on_final=on_final, observers=self._observers,
            charge=charge,
        )
        self._engine = engine
        self._running: asyncio.Task[None] | None = None

    @property
    def database(self) -> Engine:
        """The jobs database, shared with the Batch API's tables (files, batches)."""
        return self._engine

    def runs_other_lines(self, line: JobRecord) -> bool:
        return self._dispatcher.runs_other_lines(line)

    def wake(self) -> None:
        """Work was just stored (a batch's lines): claim it now rather than at the next poll."""
        self._dispatcher.wake()

    def observe(self, observer: FinalObserver) -> None:
        """Subscribe (metrics) to every job's final status."""
        self._observers.append(observer)

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self._engine)
        self._running = asyncio.create_task(self._dispatcher.run_forever(), name="jobs dispatcher")

    async def stop(self) -> None:
        """The poll loop is let finish its poll rather than cancelled: a claim cancelled while
        its database call runs would leave jobs claimed by nobody until the next start."""
        self._dispatcher.stop_claiming()
        if self._running is not None:
            await self._running
        await self._dispatcher.stop()
        self._store.close()

    def counts_by_status(self) -> dict[str, int]:
        """Jobs by status (across replicas) as of the dispatcher's last poll: read by /metrics
        on the event loop, so never a database query of its own. Empty until the first poll."""
        return self._dispatcher.counts

    # -- submission ------------------------------------------------------------------------

    async def submit(
        self,
        request: ImageRequest,
        *,
        owner: str,
        request_id: str,
        idempotency_key: str | None = None,
        allowed: frozenset[str] | None = None,
        admit: Admission | None = None,
    ) -> Submitted:
        """Check the request exactly as a synchronous one (same 400 and 501), then store it
        with its uploads; it is durable once this returns."""
        now = time.time()
        if idempotency_key is not None:
            earlier = await asyncio.to_thread(self._store.find_idempotent, owner, idempotency_key,
                                              now - IDEMPOTENCY_WINDOW_S)
            if earlier is not None:
                return Submitted(earlier, created=False)
        if request.stream:
            raise InvalidRequest("stream cannot be combined with 'Prefer: respond-async': follow the job at "
                                 "/images/jobs/{id}/events instead", param="stream", code="invalid_value")
        await self._check_room(owner)
        route = self._registry.route(request.model, allowed)
        model = route.model
        await self._images.prepare(as_checked(request), model, admit, preset=route.preset)
        record = JobRecord(
            id=new_job_id(), owner=owner, endpoint=request.endpoint.value, model=model.id,
            request=request_fields(request), status=JobStatus.QUEUED, created_at=now, request_id=request_id,
            idempotency_key=idempotency_key,
        )
        stored = await asyncio.to_thread(self._store.insert, record, request_inputs(request),
                                         now - IDEMPOTENCY_WINDOW_S)
        if stored.id != record.id:  # a simultaneous submission with the same key won
            return Submitted(stored, created=False)
        self._dispatcher.wake()
        return Submitted(record, created=True)

    async def _check_room(self, owner: str) -> None:
        settings = self._settings
        if await asyncio.to_thread(self._store.count_pending) >= settings.max_pending_jobs:
            raise Overloaded(f"the server already holds {settings.max_pending_jobs} pending jobs; retry later",
                             retry_after=JOBS_FULL_RETRY_AFTER_S)
        per_key = settings.max_jobs_per_key
        if per_key is not None and await asyncio.to_thread(self._store.count_pending, owner) >= per_key:
            raise Overloaded(f"you already have {per_key} pending jobs; retry once some have finished",
                             retry_after=JOBS_FULL_RETRY_AFTER_S)

    # -- reading ---------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str) -> JobRecord:
        """The caller's job; another caller's is not found, as an unknown id is."""
        record = await asyncio.to_thread(self._store.get, job_id)
        if record is None or record.owner != owner:
            raise NotFound(f"no job with id '{job_id}'", param="job_id", code="not_found")
        if record.status is JobStatus.EXPIRED or (record.finished and (record.expires_at or 0) <= time.time()):
            raise Gone(f"job '{job_id}' has expired: finished jobs and their images are kept "
                       f"{self._settings.job_ttl_s:g} s", param="job_id", code="job_expired")
        return record

    async def state(self, record: JobRecord) -> JobState:
        position = None
        if record.status is JobStatus.QUEUED:
            position = await asyncio.to_thread(self._store.queue_position, record)
        return JobState(record, position)

    async def list(
        self, owner: str, *, status: JobStatus | None, after: str | None, limit: int
    ) -> tuple[list[JobRecord], bool]:
        """The caller's jobs, newest first, and whether more follow."""
        cursor = None
        if after is not None:
            cursor = await asyncio.to_thread(self._store.get, after)
            if cursor is None or cursor.owner != owner:
                raise InvalidRequest(f"after: no job with id '{after}'", param="after", code="invalid_value")
        records = await asyncio.to_thread(self._store.list, owner, status=status, after=cursor, limit=limit)
        return records[:limit], len(records) > limit

    # -- client actions --------------------------------------------------------------------

    async def cancel(self, job_id: str, owner: str) -> JobRecord:
        """A queued job never runs; a running one stops at its next step (on whichever replica
        runs it: the flag is in the database). A finished job is a conflict."""
        record = await self.get(job_id, owner)
        if record.finished:
            raise Conflict(f"job '{job_id}' has already finished ({record.status.value}); it cannot be cancelled",
                           param="job_id", code="job_finished")
        cancelled = await asyncio.to_thread(self._store.cancel, job_id, time.time(), self._settings.job_ttl_s,
                                            cancelled_error())
        if cancelled is None:
            raise NotFound(f"no job with id '{job_id}'", param="job_id", code="not_found")
        if record.status is JobStatus.QUEUED and cancelled.status is JobStatus.CANCELLED:
            await self._dispatcher.announce(cancelled)
        self._dispatcher.stop_here(job_id)  # elsewhere, its replica sees the flag at its next poll
        return cancelled

    async def delete(self, job_id: str, owner: str) -> None:
        """The record and its images go; a running job is cancelled first."""
        record = await self.get(job_id, owner)
        if not record.finished:
            await asyncio.to_thread(self._store.cancel, job_id, time.time(), self._settings.job_ttl_s,
                                            cancelled_error())
            self._dispatcher.stop_here(job_id)
        await asyncio.to_thread(self._store.delete, job_id)
        await asyncio.to_thread(self.storage.delete, record.image_names)

    async def follow(self, job_id: str, owner: str) -> AsyncIterator[JobEvent]:
        """The job's state now, then its changes until it ends: step by step (and previews)
        where it runs in this process, from the database at the poll rate elsewhere. A
        finished job yields its final state alone."""
        record = await self.get(job_id, owner)
        state = await self.state(record)
        yield state
        while not record.finished:
            live = self._live.get(job_id)
            if live is not None:
                async for event in live.follow():
                    yield event
            else:
                await asyncio.sleep(self._settings.job_poll_s)
            fresh = await asyncio.to_thread(self._store.get, job_id)
            if fresh is None or fresh.status is JobStatus.EXPIRED:
                raise NotFound(f"job '{job_id}' was deleted", param="job_id", code="not_found")
            new_state = await self.state(fresh)
            if _changed(state, new_state):
                yield new_state
            state, record = new_state, fresh


def _changed(before: JobState, after: JobState) -> bool:
    keys = ("status", "step", "total_steps", "image_index")
    return before.queue_position != after.queue_position or any(
        getattr(before.job, key) != getattr(after.job, key) for key in keys
    )


