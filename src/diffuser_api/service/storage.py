"""Where ``response_format=url`` images live: a local folder or an object store, via fsspec.

Names are ``<unix seconds>-<32 random characters>.<format>``: unguessable like a presigned URL,
and carrying their own age, so expiry needs neither object metadata nor a database. The file
route accepts only names of that exact shape, so no name a client sends leaves the root.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from diffuser_api.config import Settings
from diffuser_api.errors import NotFound
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


class ImageStorage:
    def __init__(
        self,
        url: str,
        options: dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
        presign: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))
        self.root = self.root.rstrip("/")
        self._protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        self._local = isinstance(self._fs, LocalFileSystem)
        self._ttl_s = ttl_s or None
        self._presign = presign and self._protocol in SIGNING_PROTOCOLS
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageStorage:
        return cls(
            settings.storage_url or str(settings.storage_dir),
            settings.storage_options,
            ttl_s=settings.storage_ttl_s,
            presign=settings.storage_presign,
        )

    def save(self, data: bytes, output_format: str) -> str:
        # Rounded up: an image may outlive its time to live by under a second, never fall short.
        name = f"{math.ceil(self._clock()):010d}-{secrets.token_urlsafe(24)}.{output_format}"
        path = f"{self.root}/{name}"
        if self._local:
            self._save_local(data, path)
        else:
            # An object appears only once its upload completes, so no partial file is ever served.
            argument = CONTENT_TYPE_ARGUMENT.get(self._protocol)
            extra = {argument: MEDIA_TYPES[output_format]} if argument else {}
            self._fs.pipe_file(path, data, **extra)
        return name

    def _save_local(self, data: bytes, path: str) -> None:
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
        match = NAME_PATTERN.fullmatch(name)
        if match is None or self._expired(int(match["created"])):
            raise self._not_found(name)
        try:
            return self._fs.cat_file(f"{self.root}/{name}")
        except FileNotFoundError:
            raise self._not_found(name) from None

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
            match = NAME_PATTERN.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
            if match is not None and self._expired(int(match["created"])):
                expired.append(path)
        if expired:
            self._fs.rm(expired)
        return len(expired)

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
