"""Every read and write of the jobs database, as blocking calls (the service runs them in threads).

Claims are ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas never take the same
job; every state change after a claim names the lease owner, so a replica whose lease lapsed
(and whose job another replica took) cannot overwrite the new run's outcome.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from diffuser_api.jobs.idempotency import insert_once
from diffuser_api.jobs.records import FINAL, PENDING, JobRecord, JobStatus, column_values
from diffuser_api.jobs.schema import job_inputs, jobs

FIELDS = [field.name for field in dataclasses.fields(JobRecord)]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one run of a job ended, as ``JobStore.finish`` records it."""

    job_id: str
    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def _record(row: Any) -> JobRecord:
    values = dict(row._mapping)
    values["status"] = JobStatus(values["status"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)


# One outcome recorded, run for every job that ends in a group (still guarded: only a job this
# replica holds in progress changes). The columns it sets are the keys of each parameter set.
FINISH = jobs.update().where(jobs.c.id == sa.bindparam("job"), jobs.c.lease_owner == sa.bindparam("holder"),
                             jobs.c.status == JobStatus.IN_PROGRESS.value)
# The statements of every claim and every group of outcomes, built once (see ``CLAIM``).
_HELD = (sa.select(jobs)
         .where(jobs.c.id.in_(sa.bindparam("ids", expanding=True)), jobs.c.lease_owner == sa.bindparam("holder"),
                jobs.c.status == JobStatus.IN_PROGRESS.value)
         .with_for_update())
_DROP_INPUTS = job_inputs.delete().where(job_inputs.c.job_id.in_(sa.bindparam("ids", expanding=True)))
_INPUTS = (sa.select(job_inputs.c.job_id, job_inputs.c.param, job_inputs.c.data)
           .where(job_inputs.c.job_id.in_(sa.bindparam("ids", expanding=True)))
           .order_by(job_inputs.c.job_id, job_inputs.c.position))


# A claim: up to ``claim_limit`` of the oldest queued jobs of ``claim_model`` (async jobs first,
# then batch lines in their order; a line held back for its caller's rate limit waits until its
# ``not_before``) become this replica's, in one statement that returns them. Built once: a claim
# runs every few lines of a batch, and building three statements per claim cost more CPU than
# running them (on SQLite, per claim of 8: 3.0 ms before, in the server beside the pipeline).
# The locked, limited selection is a MATERIALIZED common table expression: PostgreSQL ran the
# same selection as a plain ``IN (subquery)`` again for rows it updated, and a claim of 3 took 60.
_CLAIMABLE = (
    sa.select(jobs.c.id)
    .where(jobs.c.status == JobStatus.QUEUED.value, jobs.c.model == sa.bindparam("claim_model"),
           sa.or_(jobs.c.not_before.is_(None), jobs.c.not_before <= sa.bindparam("claim_now")))
    .order_by(jobs.c.job_class, jobs.c.created_at, jobs.c.line)
    .limit(sa.bindparam("claim_limit"))
    .with_for_update(skip_locked=True)
    .cte("claimable")
    .prefix_with("MATERIALIZED")
)
CLAIM = (
    jobs.update()
    .where(jobs.c.id.in_(sa.select(_CLAIMABLE.c.id)), jobs.c.status == JobStatus.QUEUED.value)
    .values(status=JobStatus.IN_PROGRESS.value, attempts=jobs.c.attempts + 1, started_at=sa.bindparam("claim_now"),
            lease_owner=sa.bindparam("claim_replica"), lease_expires_at=sa.bindparam("lease_until"), step=None,
            total_steps=None, image_index=None)
    .returning(*jobs.c)
)


def _claim_order(record: JobRecord) -> tuple[int, float, int]:
    return record.job_class, record.created_at, record.line or 0


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def close(self) -> None:
        self._engine.dispose()

    # -- submission ------------------------------------------------------------------------

    def insert(self, record: JobRecord, inputs: Sequence[tuple[str, bytes]], idempotent_since: float) -> JobRecord:
        """The job and its uploads in one transaction: a 202 is sent only once both are stored.
        Returns the job stored: this one, or the earlier one with the same Idempotency-Key
        (created since ``idempotent_since``) that a simultaneous submission stored first."""
        def write(connection: Connection) -> None:
            connection.execute(jobs.insert().values(**column_values(record)))
            if inputs:
                connection.execute(job_inputs.insert(), [
                    {"job_id": record.id, "position": position, "param": param, "data": data}
                    for position, (param, data) in enumerate(inputs)
                ])

        earlier = insert_once(self._engine, jobs, record.owner, record.idempotency_key, idempotent_since, write)
        return record if earlier is None else _record(earlier)

    def find_idempotent(self, owner: str, key: str, since: float) -> JobRecord | None:
        query = (sa.select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key,
                                       jobs.c.created_at >= since)
                 .order_by(jobs.c.created_at).limit(1))
        with self._engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _record(row)

    def count_pending(self, owner: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status.in_([s.value for s in PENDING]),
                                                                  jobs.c.batch_id.is_(None))
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        with self._engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._engine.connect() as connection:
            row = connection.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else _record(row)

    def list(self, owner: str, *, status: JobStatus | None, after: JobRecord | None, limit: int) -> list[JobRecord]:
        """Newest first; ``limit + 1`` rows come back so the caller can tell ``has_more``."""
        query = sa.select(jobs).where(jobs.c.owner == owner, jobs.c.batch_id.is_(None))
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if after is not None:
            query = query.where(sa.or_(
                jobs.c.created_at < after.created_at,
                sa.and_(jobs.c.created_at == after.created_at, jobs.c.id < after.id),
            ))
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        with self._engine.connect() as connection:
            return [_record(row) for row in connection.execute(query)]

    def inputs_of(self, job_ids: Sequence[str]) -> dict[str, list[tuple[str, bytes]]]:
        """The input images of several jobs (claimed together) in one read; a job without
        any (a generation) is absent."""
        found: dict[str, list[tuple[str, bytes]]] = {}
        with self._engine.connect() as connection:
            for row in connection.execute(_INPUTS, {"ids": list(job_ids)}):
                found.setdefault(row.job_id, []).append((row.param, bytes(row.data)))
        return found

    def queue_position(self, record: JobRecord) -> int:
        """Queued jobs of the same model submitted before this one (batch lines come after)."""
        query = sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.status == JobStatus.QUEUED.value, jobs.c.model == record.model,
            jobs.c.created_at < record.created_at, jobs.c.batch_id.is_(None),
        )
        with self._engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def counts_by_status(self) -> dict[str, int]:
        query = sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
        with self._engine.connect() as connection:
            return {status: int(count) for status, count in connection.execute(query)}

    # -- client actions --------------------------------------------------------------------

    def cancel(self, job_id: str, now: float, ttl_s: float, error: dict[str, Any]) -> JobRecord | None:
        """A queued job is cancelled at once (it never runs); a running one is asked to stop
        (its replica sees the flag at its next poll). Returns the job as it is now."""
        with self._engine.begin() as connection:
            connection.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.CANCELLED.value, completed_at=now, expires_at=now + ttl_s, error=error)
            )
            connection.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(cancel_requested=True)
            )
            connection.execute(job_inputs.delete().where(
                job_inputs.c.job_id == job_id,
                jobs.select().where(jobs.c.id == job_id, jobs.c.status == JobStatus.CANCELLED.value).exists(),
            ))
            row = connection.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else _record(row)

    def delete(self, job_id: str) -> None:
        with self._engine.begin() as connection:
            connection.execute(job_inputs.delete().where(job_inputs.c.job_id == job_id))
            connection.execute(jobs.delete().where(jobs.c.id == job_id))

    # -- the dispatcher --------------------------------------------------------------------

    def claim(self, model: str, limit: int, replica: str, now: float, lease_s: float) -> list[JobRecord]:
        """Take up to ``limit`` of the oldest queued jobs of ``model`` for ``replica``: async
        jobs first, then batch lines in their order. Lines held back for their caller's rate
        limit wait until their ``not_before``."""
        with self._engine.begin() as connection:
            rows = connection.execute(CLAIM, {"claim_model": model, "claim_now": now, "claim_limit": limit,
                                              "claim_replica": replica, "lease_until": now + lease_s})
            return sorted((_record(row) for row in rows), key=_claim_order)  # RETURNING keeps no order

    def renew(self, job_ids: Iterable[str], replica: str, until: float) -> set[str]:
        """Extend this replica's leases; returns the ids whose cancel was asked for, or that
        this replica no longer holds (another took them after a lapse): both must stop."""
        ids = list(job_ids)
        if not ids:
            return set()
        owned = sa.and_(jobs.c.id.in_(ids), jobs.c.lease_owner == replica,
                        jobs.c.status == JobStatus.IN_PROGRESS.value)
        with self._engine.begin() as connection:
            connection.execute(jobs.update().where(owned).values(lease_expires_at=until))
            held = {row.id: bool(row.cancel_requested)
                    for row in connection.execute(sa.select(jobs.c.id, jobs.c.cancel_requested).where(owned))}
        return {job_id for job_id in ids if held.get(job_id, True)}

    def save_progress(self, job_id: str, replica: str, step: int, total: int, image_index: int) -> None:
        with self._engine.begin() as connection:
            connection.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.lease_owner == replica)
                .values(step=step, total_steps=total, image_index=image_index)
            )

    def finish(self, outcomes: Sequence[Outcome], replica: str, now: float, ttl_s: float) -> list[JobRecord | None]:
        """Record each outcome if this replica still holds its job (None where it does not),
        all in one transaction: the lines of one pipeline call end together, and one commit
        for all of them keeps SQLite's single write lock free for everything else. One read of
        the jobs held, one update run for all of them (executemany) and one delete of their
        inputs, however many end together: per-statement work, not the database, was most of
        what a batch line cost beside its pipeline call."""
        with self._engine.begin() as connection:
            held = {row.id: _record(row) for row in connection.execute(
                _HELD, {"ids": [outcome.job_id for outcome in outcomes], "holder": replica})}
            # What each recorded job becomes: written as its row's new values, and returned.
            ended = {outcome.job_id: {"status": outcome.status, "completed_at": now, "expires_at": now + ttl_s,
                                      "result": outcome.result, "error": outcome.error, "lease_owner": None,
                                      "lease_expires_at": None}
                     for outcome in outcomes if outcome.job_id in held}
            if ended:
                connection.execute(FINISH, [{"job": job_id, "holder": replica, **values,
                                             "status": values["status"].value} for job_id, values in ended.items()])
                connection.execute(_DROP_INPUTS, {"ids": list(ended)})
        return [dataclasses.replace(held[outcome.job_id], **ended[outcome.job_id]) if outcome.job_id in ended else None
                for outcome in outcomes]

    def requeue(self, job_id: str, replica: str, *, count_attempt: bool) -> None:
        """Back to the queue, from step 0; an attempt that was not the job's fault (shutdown,
        a full engine queue) is given back."""
        values: dict[str, Any] = {"status": JobStatus.QUEUED.value, "lease_owner": None, "lease_expires_at": None,
                                  "step": None, "total_steps": None, "image_index": None}
        if not count_attempt:
            values["attempts"] = jobs.c.attempts - 1
        with self._engine.begin() as connection:
            connection.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.lease_owner == replica,
                                    jobs.c.status == JobStatus.IN_PROGRESS.value).values(**values)
            )

    def defer(self, job_id: str, replica: str, not_before: float) -> None:
        """Back to the queue, untouched, until ``not_before``: its caller's rate limit has no
        room yet. It never ran, so the attempt is given back."""
        with self._engine.begin() as connection:
            connection.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.lease_owner == replica,
                                    jobs.c.status == JobStatus.IN_PROGRESS.value)
                .values(status=JobStatus.QUEUED.value, lease_owner=None, lease_expires_at=None, started_at=None,
                        attempts=jobs.c.attempts - 1, not_before=not_before)
            )

    def reclaim_lapsed(self, now: float, max_attempts: int, ttl_s: float) -> tuple[list[str], list[JobRecord]]:
        """Jobs whose replica died (lease lapsed) go back to the queue, or fail once they used
        up their attempts. Returns (requeued ids, failed jobs)."""
        lapsed = sa.and_(jobs.c.status == JobStatus.IN_PROGRESS.value, jobs.c.lease_expires_at < now)
        with self._engine.begin() as connection:
            rows = connection.execute(
                sa.select(jobs.c.id, jobs.c.attempts).where(lapsed).with_for_update(skip_locked=True)
            ).all()
            spent = [row.id for row in rows if row.attempts >= max_attempts]
            again = [row.id for row in rows if row.attempts < max_attempts]
            if again:
                connection.execute(jobs.update().where(jobs.c.id.in_(again), lapsed).values(
                    status=JobStatus.QUEUED.value, lease_owner=None, lease_expires_at=None,
                    step=None, total_steps=None, image_index=None,
                ))
            failed: list[JobRecord] = []
            if spent:
                error = {"class": "ModelFailure", "code": "job_interrupted", "param": None,
                         "message": f"the job was interrupted {max_attempts} times (the server running it "
                                    "stopped or crashed); it is not tried again"}
                connection.execute(jobs.update().where(jobs.c.id.in_(spent), lapsed).values(
                    status=JobStatus.FAILED.value, completed_at=now, expires_at=now + ttl_s, error=error,
                    lease_owner=None, lease_expires_at=None,
                ))
                connection.execute(job_inputs.delete().where(job_inputs.c.job_id.in_(spent)))
                failed = [_record(row) for row in connection.execute(sa.select(jobs).where(jobs.c.id.in_(spent)))]
        return again, failed

    def expire(self, now: float) -> list[JobRecord]:
        """Finished jobs past their time to live become ``expired`` (410); returns them as
        they were, so their images can be deleted."""
        done = sa.and_(jobs.c.status.in_([status.value for status in FINAL]), jobs.c.expires_at <= now)
        with self._engine.begin() as connection:
            records = [_record(row) for row in connection.execute(sa.select(jobs).where(done))]
            if records:
                connection.execute(jobs.update().where(jobs.c.id.in_([r.id for r in records]))
                                   .values(status=JobStatus.EXPIRED.value, result=None))
        return records

    def purge(self, before: float) -> int:
        """Expired jobs whose tombstone (the 410) has been kept long enough are deleted (404)."""
        with self._engine.begin() as connection:
            return connection.execute(
                jobs.delete().where(jobs.c.status == JobStatus.EXPIRED.value, jobs.c.expires_at < before)
            ).rowcount
