"""The ``/v1/files`` use cases: upload (streamed to the store), read, list, download, delete,
expire; and the bytes of a ``vision`` file for an edit that names it by ``file_id``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import IO

from diffuser_api.config import Settings
from diffuser_api.errors import InvalidRequest, NotFound, PayloadTooLarge
from diffuser_api.jobs.file_records import UPLOADABLE, FileRecord, FileStore, Purpose
from diffuser_api.service.file_contents import FileContents, new_file_id

logger = logging.getLogger(__name__)

# The same Idempotency-Key from the same caller within this long returns the first file.
IDEMPOTENCY_WINDOW_S = 24 * 3600.0
MAX_FILENAME = 512


class FileUpload:
    """One upload being written: counts bytes and lines as they pass, and stops at the caller's
    quota or the batch line cap rather than after the whole body was stored."""

    def __init__(self, file_id: str, stream: IO[bytes], room_bytes: int | None, max_lines: int) -> None:
        self.file_id = file_id
        self._stream = stream
        self._room_bytes = room_bytes
        self._max_lines = max_lines
        self.bytes = 0
        self.newlines = 0
        self._last = b""
        self.purpose: Purpose | None = None  # known once its form field arrived

    def write(self, data: bytes) -> None:
        """Blocking (an object store answers over the network): called in a thread."""
        self.bytes += len(data)
        if self._room_bytes is not None and self.bytes > self._room_bytes:
            raise PayloadTooLarge("this upload would exceed your files storage quota; delete files you no longer "
                                  "need", param="file", code="files_quota_exceeded")
        self.newlines += data.count(b"\n")
        self._last = data[-1:] or self._last
        self._check_lines()
        self._stream.write(data)

    @property
    def lines(self) -> int:
        """JSONL lines: a last line without its newline counts too."""
        return self.newlines + (1 if self._last not in (b"", b"\n") else 0)

    def _check_lines(self) -> None:
        if self.purpose is Purpose.BATCH and self.lines > self._max_lines:
            raise InvalidRequest(f"a batch file holds at most {self._max_lines} lines", param="file",
                                 code="too_many_lines")


class RepeatedUpload(Exception):  # noqa: N818 - not an error: the answer is the earlier file
    """A simultaneous upload with the same Idempotency-Key stored its file first: this upload's
    bytes are dropped (as those of a refused upload are) and the earlier file is the answer."""

    def __init__(self, earlier: FileRecord) -> None:
        super().__init__(earlier.id)
        self.earlier = earlier


class FileService:
    def __init__(self, settings: Settings, store: FileStore, contents: FileContents) -> None:
        self._settings = settings
        self._store = store
        self.contents = contents

    # -- upload ----------------------------------------------------------------------------

    async def earlier_upload(self, owner: str, idempotency_key: str | None) -> FileRecord | None:
        if idempotency_key is None:
            return None
        return await asyncio.to_thread(self._store.find_idempotent, owner, idempotency_key,
                                       time.time() - IDEMPOTENCY_WINDOW_S)

    @contextlib.asynccontextmanager
    async def upload(self, owner: str) -> AsyncIterator[FileUpload]:
        """A new file's bytes go straight to the store; if the upload is refused or breaks off,
        they are deleted."""
        room = None
        if (quota := self._settings.files_max_bytes_per_key) is not None:
            room = quota - await asyncio.to_thread(self._store.bytes_of, owner)
        file_id = new_file_id()
        with self.contents.writer(file_id) as stream:
            yield FileUpload(file_id, stream, room, self._settings.max_batch_lines)

    async def commit(
        self, upload: FileUpload, *, owner: str, filename: str, expires_after_s: float | None,
        idempotency_key: str | None,
    ) -> FileRecord:
        """The record of a fully written upload; from here on it can be listed and used."""
        purpose = upload.purpose
        if purpose is None:
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                                 code="missing_required_parameter")
        upload._check_lines()
        if purpose is Purpose.BATCH and upload.lines == 0:
            raise InvalidRequest("the batch file is empty", param="file", code="empty_file")
        now = time.time()
        ttl = expires_after_s if expires_after_s is not None else (
            self._settings.file_ttl_s if purpose is Purpose.BATCH else None)
        record = FileRecord(
            id=upload.file_id, owner=owner, filename=filename[:MAX_FILENAME] or "upload", purpose=purpose,
            bytes=upload.bytes, lines=upload.lines, created_at=now, expires_at=None if ttl is None else now + ttl,
            idempotency_key=idempotency_key,
        )
        stored = await asyncio.to_thread(self._store.insert_upload, record, now - IDEMPOTENCY_WINDOW_S)
        if stored.id != record.id:
            raise RepeatedUpload(stored)
        logger.info("file %s stored: %s, %d bytes, %d lines", record.id, purpose.value, record.bytes, record.lines)
        return record

    @staticmethod
    def purpose_of(value: str) -> Purpose:
        try:
            purpose = Purpose(value)
        except ValueError:
            purpose = None
        if purpose not in UPLOADABLE:
            raise InvalidRequest(f"purpose '{value}' is not supported; use one of: "
                                 f"{', '.join(p.value for p in UPLOADABLE)}", param="purpose", code="invalid_value")
        return purpose

    # -- reading ---------------------------------------------------------------------------

    async def get(self, file_id: str, owner: str) -> FileRecord:
        """The caller's file; another caller's, or one past its expiry, is not found."""
        record = await asyncio.to_thread(self._store.get, file_id)
        if record is None or record.owner != owner or (record.expires_at is not None
                                                       and record.expires_at <= time.time()):
            raise NotFound(f"No such File object: {file_id}", param="file_id", code="not_found")
        return record

    async def list(self, owner: str, *, purpose: str | None, after: str | None, limit: int,
                   ascending: bool) -> tuple[list[FileRecord], bool]:
        cursor = None
        if after is not None:
            cursor = await asyncio.to_thread(self._store.get, after)
            if cursor is None or cursor.owner != owner:
                raise InvalidRequest(f"after: no file with id '{after}'", param="after", code="invalid_value")
        records = await asyncio.to_thread(self._store.list, owner, purpose=purpose, after=cursor, limit=limit,
                                          ascending=ascending)
        now = time.time()
        live = [record for record in records if record.expires_at is None or record.expires_at > now]
        return live[:limit], len(records) > limit

    async def content(self, file_id: str, owner: str) -> tuple[FileRecord, AsyncIterator[bytes]]:
        record = await self.get(file_id, owner)
        return record, _in_thread(self.contents.chunks(file_id))

    async def image_bytes(self, file_id: str, owner: str, param: str) -> bytes:
        """A ``vision`` file's bytes, for an edit's ``{"file_id": ...}`` image."""
        try:
            record = await self.get(file_id, owner)
        except NotFound:
            raise InvalidRequest(f"no file with id '{file_id}'", param=param, code="invalid_file_id") from None
        if record.purpose is not Purpose.VISION:
            raise InvalidRequest(f"file '{file_id}' has purpose '{record.purpose.value}'; images referenced by "
                                 "file_id must be uploaded with purpose 'vision'", param=param,
                                 code="invalid_file_id")
        if record.bytes > self._settings.max_upload_bytes:
            raise PayloadTooLarge(f"file '{file_id}' is larger than the {self._settings.max_upload_bytes} bytes an "
                                  "image may have", param=param, code="image_too_large")
        return await asyncio.to_thread(self.contents.read, file_id)

    # -- deletion --------------------------------------------------------------------------

    async def delete(self, file_id: str, owner: str) -> None:
        await self.get(file_id, owner)
        await self.remove(file_id)

    async def remove(self, file_id: str) -> None:
        if await asyncio.to_thread(self._store.delete, file_id):
            await asyncio.to_thread(self.contents.delete, file_id)

    async def expire(self, now: float) -> int:
        expired = await asyncio.to_thread(self._store.expired, now)
        for file_id in expired:
            await self.remove(file_id)
        return len(expired)


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking iterator read off the event loop, one chunk at a time."""
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield chunk  # type: ignore[misc]
