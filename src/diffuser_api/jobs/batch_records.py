"""A batch as stored, and its reads and writes in the jobs database.

A batch's lines are rows of ``jobs`` (with ``batch_id``, ``custom_id``, ``line``), so the job
dispatcher runs them with its leases, crash recovery and exactly-once outcome; this table holds
the batch itself.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from diffuser_api.jobs.file_records import FileRecord, FileStore
from diffuser_api.jobs.idempotency import insert_once
from diffuser_api.jobs.records import PENDING, JobRecord, JobStatus, column_values
from diffuser_api.jobs.schema import batches, job_inputs, jobs
from diffuser_api.jobs.store import _record as job_record

# Rows of a finished batch's lines read at once while its output is written.
LINES_PER_READ = 256


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


BATCH_FINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
RUNNING = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class BatchRecord:
    id: str
    owner: str
    request_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    url_base: str
    output_ttl_s: float
    created_at: float
    expires_at: float
    metadata: dict[str, str] | None = None
    allowed_models: list[str] | None = None
    idempotency_key: str | None = None
    total: int = 0
    completed: int | None = None
    failed: int | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    charge_to: str | None = None  # the rate-limit identity its lines are charged to as they run

    @property
    def finished(self) -> bool:
        return self.status in BATCH_FINAL


@dataclass(frozen=True)
class LineCounts:
    total: int
    completed: int
    failed: int
    pending: int


def _record(row: Any) -> BatchRecord:
    values = dict(row._mapping)
    values["status"] = BatchStatus(values["status"])
    return BatchRecord(**values)


class BatchStore:
    def __init__(self, engine: Engine, files: FileStore) -> None:
        self._engine = engine
        self._files = files

    def insert(self, record: BatchRecord, idempotent_since: float) -> BatchRecord:
        """Returns the batch stored: this one, or the earlier one with the same Idempotency-Key
        (created since ``idempotent_since``) that a simultaneous request stored first."""
        def write(connection: Connection) -> None:
            connection.execute(batches.insert().values(**dataclasses.asdict(record) | {"status": record.status.value}))

        earlier = insert_once(self._engine, batches, record.owner, record.idempotency_key, idempotent_since, write)
        return record if earlier is None else _record(earlier)

    def get(self, batch_id: str) -> BatchRecord | None:
        with self._engine.connect() as connection:
            row = connection.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
        return None if row is None else _record(row)

    def find_idempotent(self, owner: str, key: str, since: float) -> BatchRecord | None:
        query = (sa.select(batches).where(batches.c.owner == owner, batches.c.idempotency_key == key,
                                          batches.c.created_at >= since).order_by(batches.c.created_at).limit(1))
        with self._engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _record(row)

    def list(self, owner: str, *, after: BatchRecord | None, limit: int) -> list[BatchRecord]:
        """Newest first, ``limit + 1`` rows so the caller can tell ``has_more``."""
        query = sa.select(batches).where(batches.c.owner == owner)
        if after is not None:
            query = query.where(sa.or_(
                batches.c.created_at < after.created_at,
                sa.and_(batches.c.created_at == after.created_at, batches.c.id < after.id),
            ))
        query = query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
        with self._engine.connect() as connection:
            return [_record(row) for row in connection.execute(query)]

    def with_status(self, *statuses: BatchStatus) -> list[BatchRecord]:
        query = sa.select(batches).where(batches.c.status.in_([status.value for status in statuses]))
        with self._engine.connect() as connection:
            return [_record(row) for row in connection.execute(query.order_by(batches.c.created_at))]

    def counts(self, batch_id: str) -> LineCounts:
        query = (sa.select(jobs.c.status, sa.func.count()).where(jobs.c.batch_id == batch_id)
                 .group_by(jobs.c.status))
        with self._engine.connect() as connection:
            by_status = {JobStatus(status): int(count) for status, count in connection.execute(query)}
        return LineCounts(
            total=sum(by_status.values()), completed=by_status.get(JobStatus.COMPLETED, 0),
            failed=by_status.get(JobStatus.FAILED, 0),
            pending=sum(by_status.get(status, 0) for status in PENDING),
        )

    # -- state changes: each guarded by the status it leaves, so two replicas never both make it

    def fail_validation(self, batch_id: str, now: float, errors: list[dict[str, Any]]) -> bool:
        with self._engine.begin() as connection:
            return bool(connection.execute(
                batches.update().where(batches.c.id == batch_id, batches.c.status == BatchStatus.VALIDATING.value)
                .values(status=BatchStatus.FAILED.value, failed_at=now, errors={"object": "list", "data": errors})
            ).rowcount)

    def start(self, batch_id: str, now: float, lines: Sequence[tuple[JobRecord, list[tuple[str, bytes]]]]) -> bool:
        """The batch's lines become queued (or, refused, failed) jobs in the same transaction
        that makes it ``in_progress``: after a crash either all are stored or it validates again."""
        with self._engine.begin() as connection:
            started = connection.execute(
                batches.update().where(batches.c.id == batch_id, batches.c.status == BatchStatus.VALIDATING.value)
                .values(status=BatchStatus.IN_PROGRESS.value, in_progress_at=now, total=len(lines))
            ).rowcount
            if not started:
                return False
            connection.execute(jobs.insert(), [column_values(record) for record, _ in lines])
            inputs = [{"job_id": record.id, "position": position, "param": param, "data": data}
                      for record, uploads in lines for position, (param, data) in enumerate(uploads)]
            if inputs:
                connection.execute(job_inputs.insert(), inputs)
        return True

    def stop_queued(self, batch_id: str, status: BatchStatus, now: float, ttl_s: float, error: dict[str, Any],
                    **stamps: float) -> bool:
        """Cancelling or expiring: queued lines never run (running ones finish)."""
        with self._engine.begin() as connection:
            changed = connection.execute(
                batches.update().where(batches.c.id == batch_id,
                                       batches.c.status.in_([s.value for s in RUNNING + (BatchStatus.VALIDATING,)]))
                .values(status=status.value, **stamps)
            ).rowcount
            if not changed:
                return False
            queued = sa.and_(jobs.c.batch_id == batch_id, jobs.c.status == JobStatus.QUEUED.value)
            connection.execute(job_inputs.delete().where(
                job_inputs.c.job_id.in_(sa.select(jobs.c.id).where(queued))))
            connection.execute(jobs.update().where(queued).values(
                status=JobStatus.CANCELLED.value, completed_at=now, expires_at=now + ttl_s, error=error))
        return True

    def has_pending(self, batch_id: str) -> bool:
        """A read first, so the write below (which takes SQLite's one write lock from the
        dispatcher) runs only once per batch rather than after every line."""
        query = sa.select(jobs.c.id).where(jobs.c.batch_id == batch_id,
                                           jobs.c.status.in_([status.value for status in PENDING])).limit(1)
        with self._engine.connect() as connection:
            return connection.execute(query).first() is not None

    def begin_finalizing(self, batch_id: str, now: float) -> bool:
        """Once no line is pending: ``finalizing`` (the outputs are being written)."""
        pending = sa.select(jobs.c.id).where(jobs.c.batch_id == batch_id,
                                             jobs.c.status.in_([status.value for status in PENDING])).exists()
        with self._engine.begin() as connection:
            return bool(connection.execute(
                batches.update().where(batches.c.id == batch_id,
                                       batches.c.status.in_([status.value for status in RUNNING]), ~pending)
                .values(status=BatchStatus.FINALIZING.value, finalizing_at=now)
            ).rowcount)

    def lines(self, batch_id: str) -> Iterator[JobRecord]:
        """The batch's lines in file order, read a page at a time."""
        last = 0
        while True:
            query = (sa.select(jobs).where(jobs.c.batch_id == batch_id, jobs.c.line > last)
                     .order_by(jobs.c.line).limit(LINES_PER_READ))
            with self._engine.connect() as connection:
                page = [job_record(row) for row in connection.execute(query)]
            yield from page
            if len(page) < LINES_PER_READ:
                return
            last = page[-1].line or 0

    def finish(self, batch_id: str, status: BatchStatus, now: float, counts: LineCounts,
               outputs: Sequence[FileRecord], output_file_id: str | None, error_file_id: str | None) -> bool:
        """The output files' records and the final status, together; False if another replica
        finished it first (the caller deletes the files it wrote)."""
        stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.CANCELLED: "cancelled_at",
                 BatchStatus.EXPIRED: "expired_at"}[status]
        with self._engine.begin() as connection:
            finished = connection.execute(
                batches.update().where(batches.c.id == batch_id, batches.c.status == BatchStatus.FINALIZING.value,
                                       batches.c.output_file_id.is_(None), batches.c.error_file_id.is_(None))
                .values(status=status.value, output_file_id=output_file_id, error_file_id=error_file_id,
                        completed=counts.completed, failed=counts.failed, **{stamp: now})
            ).rowcount
            if not finished:
                return False
            for record in outputs:
                self._files.insert(record, connection)
        return True
