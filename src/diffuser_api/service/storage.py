"""Where ``response_format=url`` images live: a local folder or an object store, via fsspec.

Names are ``<unix seconds>-<32 random characters>.<format>``: unguessable like a presigned URL,
and carrying their own age, so expiry needs neither object metadata nor a database. The file
route accepts only names of that exact shape, so no name a client sends leaves the root.

A store that fails (disk full, no permission, object store down) is ``Unavailable``: a 503
the client may retry, whose message names no path; the log has the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from diffuser_api.config import Settings
from diffuser_api.errors import DiffuserError, NotFound, Unavailable
from diffuser_api.service.encoding import MEDIA_TYPES

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"(?P<created>\d{10})-[A-Za-z0-9_-]{32}\.(?P<format>png|jpeg|webp)")
# Backends that sign URLs with the credentials they already hold. gcsfs can sign only with a
# service-account key, so GCS objects are served through the server instead.
SIGNING_PROTOCOLS = {"s3", "s3a"}
# How each object store names the Content-Type argument of an upload.
CONTENT_TYPE_ARGUMENT = {"s3": "ContentType", "s3a": "ContentType", "gs": "content_type", "gcs": "content_type"}
# S3 refuses presigned URLs valid for longer than 7 days.
LONGEST_SIGNATURE_S = 7 * 24 * 3600
# When a client may try again after the store failed: long enough for a hiccup to pass.
STORE_RETRY_AFTER_S = 5.0


def name_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class Quota:
    """The stored images' sizes, oldest first, so a save knows which to delete to make room.

    Scanned from the folder at the first save, then kept in memory (a listing per save would
    cost more than the write); a lock guards it because saves run on several codec threads.
    Names start with their unix time, so their order is their age. An image being written
    counts as soon as its room is made, but joins the list only once written: another save
    must never pick a file that is not there yet.
    """

    def __init__(self, max_bytes: int, scan: Callable[[], dict[str, int]]) -> None:
        self.max_bytes = max_bytes
        self._scan = scan
        self._sizes: dict[str, int] | None = None
        self._total = 0  # stored and being written
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._total

    def make_room(self, size: int) -> list[str]:
        """Counts ``size`` in and returns the oldest names to delete so it fits.

        An image larger than the whole quota is still stored, alone: refusing it would fail
        every such request for good, not just until space frees up.
        """
        with self._lock:
            if self._sizes is None:
                self._sizes = dict(sorted(self._scan().items()))
                self._total += sum(self._sizes.values())
            evicted = []
            while self._sizes and self._total + size > self.max_bytes:
                oldest = next(iter(self._sizes))
                self._total -= self._sizes.pop(oldest)
                evicted.append(oldest)
            self._total += size
            return evicted

    def stored(self, name: str, size: int) -> None:
        """The image ``make_room`` counted is written: from now on it may be deleted for room."""
        with self._lock:
            if self._sizes is not None:
                self._sizes[name] = size

    def not_stored(self, size: int) -> None:
        with self._lock:
            self._total -= size

    def forget(self, names: Iterable[str]) -> None:
        """Images gone another way: expired."""
        with self._lock:
            if self._sizes is not None:
                for name in names:
                    self._total -= self._sizes.pop(name, 0)


class ImageStorage:
    def __init__(
        self,
        url: str,
        options: dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
        presign: bool = True,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))
        self.root = self.root.rstrip("/")
        self._protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        self._local = isinstance(self._fs, LocalFileSystem)
        self._ttl_s = ttl_s or None
        self._presign = presign and self._protocol in SIGNING_PROTOCOLS
        self._clock = clock
        if max_bytes is not None and not self._local:
            # Object stores bill by use and have lifecycle rules for their size; no listing per save.
            logger.warning("storage_max_bytes applies to a local folder only; %s has no quota", self._protocol)
        self.quota = Quota(max_bytes, self._scan) if max_bytes is not None and self._local else None

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageStorage:
        return cls(
            settings.storage_url or str(settings.storage_dir),
            settings.storage_options,
            ttl_s=settings.storage_ttl_s,
            presign=settings.storage_presign,
            max_bytes=settings.storage_max_bytes,
        )

    def save(self, data: bytes, output_format: str) -> str:
        # Rounded up: an image may outlive its time to live by under a second, never fall short.
        name = f"{math.ceil(self._clock()):010d}-{secrets.token_urlsafe(24)}.{output_format}"
        path = f"{self.root}/{name}"
        with self._failures_are_unavailable("storing an image in"):
            if self._local:
                self._save_local(data, path)
            else:
                # An object appears only once its upload completes, so no partial file is ever served.
                argument = CONTENT_TYPE_ARGUMENT.get(self._protocol)
                extra = {argument: MEDIA_TYPES[output_format]} if argument else {}
                self._fs.pipe_file(path, data, **extra)
        return name

    def _save_local(self, data: bytes, path: str) -> None:
        if self.quota is None:
            self._write_local(data, path)
            return
        self._make_room(self.quota, len(data))
        try:
            self._write_local(data, path)
        except BaseException:
            self.quota.not_stored(len(data))
            raise
        self.quota.stored(name_of(path), len(data))

    def _make_room(self, quota: Quota, size: int) -> None:
        evicted = quota.make_room(size)
        for old in evicted:
            with contextlib.suppress(FileNotFoundError):  # already gone: expired, or removed by hand
                self._fs.rm_file(f"{self.root}/{old}")
        if evicted:
            logger.info("deleted the %d oldest images from %s to stay within the storage quota",
                        len(evicted), self.root)

    def _write_local(self, data: bytes, path: str) -> None:
        """Write then rename in the same folder, so a client never downloads a half-written file."""
        self._fs.makedirs(self.root, exist_ok=True)
        scratch = f"{self.root}/.partial-{secrets.token_hex(8)}"
        try:
            self._fs.pipe_file(scratch, data)
            self._fs.mv(scratch, path)
        except BaseException:
            # A failed write (disk full, bad data) must not leave scratch files piling up.
            if self._fs.exists(scratch):
                self._fs.rm_file(scratch)
            raise

    def url(self, name: str, served_base: str) -> str:
        """A presigned URL where the backend signs, else the server's own file route."""
        if not self._presign:
            return f"{served_base}/{name}"
        expires = int(min(self._ttl_s or LONGEST_SIGNATURE_S, LONGEST_SIGNATURE_S))
        return self._fs.sign(f"{self.root}/{name}", expiration=expires)

    def read(self, name: str) -> bytes:
        self.remaining_s(name)  # not found if malformed or expired
        with self._failures_are_unavailable("reading an image from"):
            try:
                return self._fs.cat_file(f"{self.root}/{name}")
            except FileNotFoundError:
                raise self._not_found(name) from None

    def delete(self, names: Iterable[str]) -> None:
        """Remove images now (a deleted or expired job's), whatever their time to live."""
        paths = [f"{self.root}/{name}" for name in names if NAME_PATTERN.fullmatch(name)]
        with self._failures_are_unavailable("deleting images from"):
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(path)
        if self.quota is not None:
            self.quota.forget(name_of(path) for path in paths)

    def remaining_s(self, name: str) -> float | None:
        """Seconds an image has left to live (None: no time to live); not found if expired."""
        match = NAME_PATTERN.fullmatch(name)
        if match is None or self._expired(int(match["created"])):
            raise self._not_found(name)
        if self._ttl_s is None:
            return None
        return int(match["created"]) + self._ttl_s - self._clock()

    def remove_expired(self) -> int:
        """Delete every stored image past its time to live; returns how many went."""
        if self._ttl_s is None:
            return 0
        self._fs.invalidate_cache(self.root)  # s3fs and gcsfs cache listings
        try:
            listing = self._fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return 0  # nothing stored yet
        expired = []
        for path in listing:
            match = NAME_PATTERN.fullmatch(name_of(path))
            if match is not None and self._expired(int(match["created"])):
                expired.append(path)
        if expired:
            self._fs.rm(expired)
            if self.quota is not None:
                self.quota.forget(name_of(path) for path in expired)
        return len(expired)

    def _scan(self) -> dict[str, int]:
        """Sizes of the images already in the folder, for the quota."""
        try:
            listing = self._fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {name_of(entry["name"]): int(entry["size"]) for entry in listing
                if NAME_PATTERN.fullmatch(name_of(entry["name"]))}

    @contextlib.contextmanager
    def _failures_are_unavailable(self, action: str) -> Iterator[None]:
        """A failing store (disk full, no permission, object store down) is a 503 to retry.

        Locally that is an ``OSError``; object-store clients raise their own classes (botocore,
        aiohttp, google-auth), so there anything the store raises counts.
        """
        failure = OSError if self._local else Exception
        try:
            yield
        except DiffuserError:
            raise
        except failure as error:
            logger.exception("%s %s failed", action, self.root)
            raise Unavailable("The image store is unavailable; try again shortly.",
                              retry_after=STORE_RETRY_AFTER_S) from error

    def _expired(self, created: int) -> bool:
        return self._ttl_s is not None and created + self._ttl_s <= self._clock()

    @staticmethod
    def _not_found(name: str) -> NotFound:
        return NotFound(f"no image named '{name}' (unknown, or past its time to live)", param="name",
                        code="not_found")


async def remove_expired_periodically(storage: ImageStorage, interval_s: float) -> None:
    """The cleanup task the app runs for its whole life."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await asyncio.to_thread(storage.remove_expired)
        except Exception:  # a storage hiccup must not end cleanup for the rest of the server's life
            logger.exception("removing expired images from %s failed; trying again later", storage.root)
        else:
            if removed:
                logger.info("removed %d expired images from %s", removed, storage.root)
