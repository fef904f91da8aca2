"""The Batch API's use cases: create, read, list, cancel; and the loop that takes each batch
from ``validating`` through ``in_progress`` to its output files.

A batch's lines run as rows of ``jobs`` of the lowest class: the job dispatcher claims them
after async jobs, feeds them to the engine as it has room (so they batch with each other), and
gives them its leases, crash recovery and exactly-once outcome. This loop only validates,
watches for the last line to end, writes the output and error files, and expires batches and
files. Every step is a guarded transaction, so a crash (or a second replica) repeats a step at
worst, never doubles its effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from diffuser_api.config import Settings
from diffuser_api.domain import ImageRequest
from diffuser_api.errors import Conflict, DiffuserError, InvalidRequest, NotFound
from diffuser_api.jobs.batch_lines import BATCH_ENDPOINTS, MAX_LISTED_ERRORS, BatchLine, check_lines
from diffuser_api.jobs.batch_records import (
    BatchRecord,
    BatchStatus,
    BatchStore,
    LineCounts,
    new_batch_id,
)
from diffuser_api.jobs.file_records import FileRecord, Purpose
from diffuser_api.jobs.file_service import FileService
from diffuser_api.jobs.outcomes import error_of
from diffuser_api.jobs.records import BATCH_LINE_CLASS, JobRecord, JobStatus
from diffuser_api.jobs.requests import as_checked, request_fields, request_inputs
from diffuser_api.models.registry import ModelRegistry
from diffuser_api.service.file_contents import new_file_id
from diffuser_api.service.images import ImageService

logger = logging.getLogger(__name__)

IDEMPOTENCY_WINDOW_S = 24 * 3600.0
COMPLETION_WINDOWS = {"24h"}
# The body of a line as the synchronous route would parse it (the API's schemas): endpoint
# ("generations" or "edits"), body, owner (whose vision files it may name).
ParseBody = Callable[[str, dict[str, Any], str], Awaitable[ImageRequest]]
# One output line of a finished line: (True for the output file / False for the error file, line).
RenderLine = Callable[[JobRecord, BatchRecord], Awaitable[tuple[bool, dict[str, Any]]]]
BatchObserver = Callable[[BatchRecord], Awaitable[None]]
# Why a line never ran, as its error file says (OpenAI's codes).
NOT_RUN = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
           "expired": ("batch_expired", "the batch expired before this request ran")}


# Expired files are looked for this often (seconds), not on every pass.
FILE_EXPIRY_INTERVAL_S = 10.0
# Finalizing renders this many lines at once (their images read from storage side by side) and
# writes them in one call: about one thread hop per line instead of three, while a chunk of
# 1024x1024 images in base64 stays near 25 MB.
LINES_PER_WRITE = 8

T = TypeVar("T")


def line_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class BatchState:
    batch: BatchRecord
    counts: LineCounts


class BatchService:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        images: ImageService,
        store: BatchStore,
        files: FileService,
        *,
        parse_body: ParseBody,
        render_line: RenderLine,
        wake_dispatcher: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._images = images
        self._store = store
        self._files = files
        self._parse_body = parse_body
        self._render_line = render_line
        self._wake_dispatcher = wake_dispatcher
        self._observers: list[BatchObserver] = []
        self._wake = asyncio.Event()
        self._whole_pass = True  # else only the batches in _lines_ended are looked at
        self._lines_ended: set[str] = set()
        self._next_file_expiry = 0.0
        self._running: asyncio.Task[None] | None = None

    def observe(self, observer: BatchObserver) -> None:
        """Hear of every batch's final status (a webhook, as for jobs)."""
        self._observers.append(observer)

    async def start(self) -> None:
        """After the jobs service migrated the database."""
        self._running = asyncio.create_task(self._run_forever(), name="batches")

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running

    # -- client actions --------------------------------------------------------------------

    async def create(
        self, *, owner: str, request_id: str, input_file_id: str, endpoint: str, completion_window: str,
        metadata: dict[str, str] | None, output_expires_after_s: float | None, allowed: frozenset[str] | None,
        url_base: str, idempotency_key: str | None, charge_to: str | None = None,
    ) -> BatchRecord:
        """``charge_to`` names the rate-limit identity each line is charged to when it runs
        (None: lines are not charged)."""
        now = time.time()
        if idempotency_key is not None:
            earlier = await asyncio.to_thread(self._store.find_idempotent, owner, idempotency_key,
                                              now - IDEMPOTENCY_WINDOW_S)
            if earlier is not None:
                return earlier
        if endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequest(f"endpoint '{endpoint}' is not supported; use one of: {', '.join(BATCH_ENDPOINTS)}",
                                 param="endpoint", code="invalid_value")
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest("completion_window must be '24h'", param="completion_window", code="invalid_value")
        try:
            source = await self._files.get(input_file_id, owner)
        except NotFound:
            raise InvalidRequest(f"no file with id '{input_file_id}'", param="input_file_id",
                                 code="invalid_file_id") from None
        if source.purpose is not Purpose.BATCH:
            raise InvalidRequest(f"file '{input_file_id}' has purpose '{source.purpose.value}', not 'batch'",
                                 param="input_file_id", code="invalid_file_purpose")
        record = BatchRecord(
            id=new_batch_id(), owner=owner, request_id=request_id, endpoint=endpoint, input_file_id=input_file_id,
            completion_window=completion_window, status=BatchStatus.VALIDATING, url_base=url_base,
            output_ttl_s=output_expires_after_s or self._settings.batch_output_ttl_s, created_at=now,
            expires_at=now + self._settings.batch_window_s, metadata=metadata,
            allowed_models=None if allowed is None else sorted(allowed), idempotency_key=idempotency_key,
            charge_to=charge_to,
        )
        stored = await asyncio.to_thread(self._store.insert, record, now - IDEMPOTENCY_WINDOW_S)
        if stored.id != record.id:  # a simultaneous request with the same key won
            return stored
        logger.info("batch %s created (request %s) from %s for %s", record.id, request_id, input_file_id, endpoint)
        self._pass_now()
        return record

    async def get(self, batch_id: str, owner: str) -> BatchRecord:
        record = await asyncio.to_thread(self._store.get, batch_id)
        if record is None or record.owner != owner:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id", code="not_found")
        return record

    async def state(self, record: BatchRecord) -> BatchState:
        if record.completed is not None and record.failed is not None:
            return BatchState(record, LineCounts(record.total, record.completed, record.failed, 0))
        counts = await asyncio.to_thread(self._store.counts, record.id)
        return BatchState(record, counts)

    async def list(self, owner: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        cursor = None
        if after is not None:
            cursor = await asyncio.to_thread(self._store.get, after)
            if cursor is None or cursor.owner != owner:
                raise InvalidRequest(f"after: no batch with id '{after}'", param="after", code="invalid_value")
        records = await asyncio.to_thread(self._store.list, owner, after=cursor, limit=limit)
        return records[:limit], len(records) > limit

    async def cancel(self, batch_id: str, owner: str) -> BatchRecord:
        """Queued lines never run; running ones finish; then the partial output is written."""
        record = await self.get(batch_id, owner)
        if record.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return record
        if record.finished or record.status is BatchStatus.FINALIZING:
            raise Conflict(f"batch '{batch_id}' is already {record.status.value}; it cannot be cancelled",
                           param="batch_id", code="batch_not_cancellable")
        now = time.time()
        await asyncio.to_thread(self._store.stop_queued, batch_id, BatchStatus.CANCELLING, now,
                                self._settings.job_ttl_s, self._not_run("cancelled"), cancelling_at=now)
        self._pass_now()
        return await self.get(batch_id, owner)

    @staticmethod
    def _not_run(why: str) -> dict[str, Any]:
        code, message = NOT_RUN[why]
        return {"class": "Cancelled", "message": message, "param": None, "code": code}

    # -- the loop --------------------------------------------------------------------------

    async def _run_forever(self) -> None:
        while True:
            whole, self._whole_pass = self._whole_pass, False
            ended, self._lines_ended = self._lines_ended, set()
            try:
                if whole:
                    await self._tick(time.time())
                else:
                    for batch_id in ended:
                        await self._finalize_if_done(batch_id, time.time())
            except DiffuserError as error:
                logger.warning("batches: the database or store could not be read: %s", error.message)
            except Exception:  # a database hiccup must not stop batches for the rest of the server's life
                logger.exception("batches: one pass failed; trying again")
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.job_poll_s)
            except TimeoutError:
                self._whole_pass = True
            self._wake.clear()

    def _pass_now(self) -> None:
        """A batch was created or cancelled: look at every batch now, not at the next poll."""
        self._whole_pass = True
        self._wake.set()

    async def _tick(self, now: float) -> None:
        for record in await asyncio.to_thread(self._store.with_status, BatchStatus.VALIDATING):
            await self._validate(record)
        for record in await asyncio.to_thread(self._store.with_status, BatchStatus.IN_PROGRESS,
                                              BatchStatus.CANCELLING):
            if record.status is BatchStatus.IN_PROGRESS and record.expired_at is None and record.expires_at <= now:
                await asyncio.to_thread(self._store.stop_queued, record.id, BatchStatus.IN_PROGRESS, now,
                                        self._settings.job_ttl_s, self._not_run("expired"), expired_at=now)
            await self._begin_finalizing_if_done(record.id, now)
        for record in await asyncio.to_thread(self._store.with_status, BatchStatus.FINALIZING):
            await self._finalize(record)
        if now >= self._next_file_expiry:
            self._next_file_expiry = now + FILE_EXPIRY_INTERVAL_S
            expired = await self._files.expire(now)
            if expired:
                logger.info("files: %d expired and deleted", expired)

    def line_finished(self, batch_id: str) -> None:
        """The dispatcher ended a line of ``batch_id``: that batch may be done (only it is
        looked at: a pass over every batch after each line would cost more than the lines)."""
        self._lines_ended.add(batch_id)
        self._wake.set()

    async def _finalize_if_done(self, batch_id: str, now: float) -> None:
        if await self._begin_finalizing_if_done(batch_id, now):
            record = await asyncio.to_thread(self._store.get, batch_id)
            if record is not None:
                await self._finalize(record)

    async def _begin_finalizing_if_done(self, batch_id: str, now: float) -> bool:
        """``finalizing`` once no line is pending; True if this call made it so."""
        if await asyncio.to_thread(self._store.has_pending, batch_id):
            return False
        return await asyncio.to_thread(self._store.begin_finalizing, batch_id, now)

    # -- validating ------------------------------------------------------------------------

    async def _validate(self, batch: BatchRecord) -> None:
        try:
            checked = await asyncio.to_thread(self._check_file, batch)
        except NotFound:
            checked = None
        if checked is None:
            errors = [{"code": "invalid_file_id", "line": None, "param": "input_file_id",
                       "message": "the input file was deleted or expired before the batch started"}]
        else:
            errors = checked.errors
        if errors:
            if await asyncio.to_thread(self._store.fail_validation, batch.id, time.time(),
                                       errors[:MAX_LISTED_ERRORS]):
                logger.info("batch %s failed validation: %d bad lines", batch.id, len(errors))
                await self._announce(batch.id)
            return
        assert checked is not None
        rows = [await self._line_job(batch, line) for line in checked.lines]
        if await asyncio.to_thread(self._store.start, batch.id, time.time(), rows):
            refused = sum(1 for record, _ in rows if record.status is JobStatus.FAILED)
            logger.info("batch %s in progress: %d lines (%d refused)", batch.id, len(rows), refused)
            self._wake_dispatcher()
            self._pass_now()

    def _check_file(self, batch: BatchRecord) -> Any:
        lines: Iterator[bytes] = self._files.contents.lines(batch.input_file_id)
        return check_lines(lines, batch.endpoint)

    async def _line_job(self, batch: BatchRecord, line: BatchLine) -> tuple[JobRecord, list[tuple[str, bytes]]]:
        """A line as a queued job, or, if the synchronous route would refuse its body (400,
        501), as a failed one: the rest of the batch runs."""
        common = {"id": f"batch_req_{secrets.token_hex(12)}", "owner": batch.owner,
                  "endpoint": BATCH_ENDPOINTS[batch.endpoint], "request_id": line_request_id(),
                  "batch_id": batch.id, "custom_id": line.custom_id, "line": line.line,
                  "job_class": BATCH_LINE_CLASS, "created_at": batch.created_at, "charge_to": batch.charge_to}
        allowed = None if batch.allowed_models is None else frozenset(batch.allowed_models)
        try:
            request = await self._parse_body(common["endpoint"], line.body, batch.owner)
            if request.stream:
                raise InvalidRequest("stream is not available in a batch", param="stream", code="invalid_value")
            model = self._registry.resolve(request.model, allowed)
            await self._images.prepare(as_checked(request), model)
        except DiffuserError as error:
            now = time.time()
            failed = JobRecord(**common, model="", request={}, status=JobStatus.FAILED, completed_at=now,
                               expires_at=now + self._settings.job_ttl_s, error=error_of(error))
            return failed, []
        record = JobRecord(**common, model=model.id, request=request_fields(request), status=JobStatus.QUEUED)
        return record, request_inputs(request)

    # -- finalizing ------------------------------------------------------------------------

    async def _finalize(self, batch: BatchRecord) -> None:
        """Both files are written in full before the batch says where they are."""
        output_id = error_id = None
        outputs: list[FileRecord] = []
        now = time.time()
        counts = await asyncio.to_thread(self._store.counts, batch.id)
        files = self._files.contents
        with contextlib.ExitStack() as stack:
            ids = {True: new_file_id(), False: new_file_id()}
            streams = {ok: stack.enter_context(files.writer(file_id)) for ok, file_id in ids.items()}
            written = {True: 0, False: 0}
            line_counts = {True: 0, False: 0}
            chunks = _chunks(self._store.lines(batch.id), LINES_PER_WRITE)
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                encoded: dict[bool, list[bytes]] = {True: [], False: []}
                for ok, body in await asyncio.gather(*(self._render_line(line, batch) for line in chunk)):
                    encoded[ok].append(json.dumps(body, separators=(",", ":")).encode() + b"\n")
                for ok, file_lines in encoded.items():
                    if file_lines:
                        data = b"".join(file_lines)
                        await asyncio.to_thread(streams[ok].write, data)
                        written[ok] += len(data)
                        line_counts[ok] += len(file_lines)
        for ok, name in ((True, "output"), (False, "error")):
            if not written[ok]:
                await asyncio.to_thread(files.delete, ids[ok])
                continue
            outputs.append(FileRecord(id=ids[ok], owner=batch.owner, filename=f"{batch.id}_{name}.jsonl",
                                      purpose=Purpose.BATCH_OUTPUT, bytes=written[ok], lines=line_counts[ok],
                                      created_at=now,
                                      expires_at=now + batch.output_ttl_s))
            if ok:
                output_id = ids[ok]
            else:
                error_id = ids[ok]
        status = (BatchStatus.CANCELLED if batch.cancelling_at is not None else
                  BatchStatus.EXPIRED if batch.expired_at is not None else BatchStatus.COMPLETED)
        if not await asyncio.to_thread(self._store.finish, batch.id, status, now, counts, outputs, output_id,
                                       error_id):
            for record in outputs:  # another replica finished it first
                await asyncio.to_thread(files.delete, record.id)
            return
        logger.info("batch %s %s: %d completed, %d failed of %d", batch.id, status.value, counts.completed,
                    counts.failed, counts.total)
        await self._announce(batch.id)

    async def _announce(self, batch_id: str) -> None:
        record = await asyncio.to_thread(self._store.get, batch_id)
        if record is None:
            return
        for observe in self._observers:
            await observe(record)


def _chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk
