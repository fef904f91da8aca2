"""A ``/v1/files`` file as stored, and its reads and writes in the jobs database."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from diffuser_api.jobs.idempotency import insert_once
from diffuser_api.jobs.schema import files


class Purpose(StrEnum):
    BATCH = "batch"  # JSONL batch input, uploaded
    BATCH_OUTPUT = "batch_output"  # a batch's output or error file, produced here
    VISION = "vision"  # an image, referenced as {"file_id": ...} in JSON edits


UPLOADABLE = (Purpose.BATCH, Purpose.VISION)


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    filename: str
    purpose: Purpose
    bytes: int
    lines: int
    created_at: float
    expires_at: float | None = None
    idempotency_key: str | None = None


def _record(row: Any) -> FileRecord:
    values = dict(row._mapping)
    values["purpose"] = Purpose(values["purpose"])
    return FileRecord(**values)


class FileStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def insert(self, record: FileRecord, connection: Connection | None = None) -> None:
        """In ``connection``'s transaction when given (a batch's outputs and its final status
        are stored together)."""
        values = dataclasses.asdict(record) | {"purpose": record.purpose.value}
        if connection is not None:
            connection.execute(files.insert().values(**values))
            return
        with self._engine.begin() as own:
            own.execute(files.insert().values(**values))

    def insert_upload(self, record: FileRecord, idempotent_since: float) -> FileRecord:
        """Returns the file stored: this one, or the earlier one with the same Idempotency-Key
        (uploaded since ``idempotent_since``) that a simultaneous upload stored first."""
        earlier = insert_once(self._engine, files, record.owner, record.idempotency_key, idempotent_since,
                              functools.partial(self.insert, record))
        return record if earlier is None else _record(earlier)

    def get(self, file_id: str) -> FileRecord | None:
        with self._engine.connect() as connection:
            row = connection.execute(sa.select(files).where(files.c.id == file_id)).first()
        return None if row is None else _record(row)

    def find_idempotent(self, owner: str, key: str, since: float) -> FileRecord | None:
        query = (sa.select(files).where(files.c.owner == owner, files.c.idempotency_key == key,
                                        files.c.created_at >= since).order_by(files.c.created_at).limit(1))
        with self._engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _record(row)

    def list(self, owner: str, *, purpose: str | None, after: FileRecord | None, limit: int,
             ascending: bool) -> list[FileRecord]:
        """``limit + 1`` rows, so the caller can tell ``has_more``."""
        query = sa.select(files).where(files.c.owner == owner)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        if after is not None:
            before = (files.c.created_at > after.created_at) if ascending else (files.c.created_at < after.created_at)
            tie = (files.c.id > after.id) if ascending else (files.c.id < after.id)
            query = query.where(sa.or_(before, sa.and_(files.c.created_at == after.created_at, tie)))
        order = (files.c.created_at, files.c.id) if ascending else (files.c.created_at.desc(), files.c.id.desc())
        with self._engine.connect() as connection:
            return [_record(row) for row in connection.execute(query.order_by(*order).limit(limit + 1))]

    def bytes_of(self, owner: str) -> int:
        """What the owner's uploads take (produced outputs are not charged to the quota)."""
        query = sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(
            files.c.owner == owner, files.c.purpose != Purpose.BATCH_OUTPUT.value)
        with self._engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def delete(self, file_id: str) -> bool:
        with self._engine.begin() as connection:
            return bool(connection.execute(files.delete().where(files.c.id == file_id)).rowcount)

    def expired(self, now: float) -> list[str]:
        query = sa.select(files.c.id).where(files.c.expires_at.is_not(None), files.c.expires_at <= now)
        with self._engine.connect() as connection:
            return list(connection.execute(query).scalars())
