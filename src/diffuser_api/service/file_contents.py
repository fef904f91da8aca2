"""The bytes of ``/v1/files`` files in the storage backend (a local folder or an object store).

Files are written as a stream of chunks and read back line by line or in chunks, so neither a
200 MB upload nor a batch's output file is ever held whole in memory. Each lives under its
file id, which the database hands out; no name from a client reaches a path.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from diffuser_api.config import Settings
from diffuser_api.errors import DiffuserError, NotFound, Unavailable

logger = logging.getLogger(__name__)

FILE_ID = re.compile(r"file-[A-Za-z0-9]{24}")
# The folder (or prefix) under the image store where files live, with no time to live there:
# files expire by their record.
FILES_FOLDER = "files"
READ_CHUNK = 1024 * 1024
STORE_RETRY_AFTER_S = 5.0


def new_file_id() -> str:
    return "file-" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                             for _ in range(24))


class FileContents:
    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self._fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        self.root = root.rstrip("/")
        self._local = isinstance(self._fs, LocalFileSystem)

    @classmethod
    def from_settings(cls, settings: Settings) -> FileContents:
        base = (settings.storage_url or str(settings.storage_dir)).rstrip("/")
        return cls(f"{base}/{FILES_FOLDER}", settings.storage_options)

    def _path(self, file_id: str) -> str:
        if not FILE_ID.fullmatch(file_id):
            raise NotFound(f"no file with id '{file_id}'", param="file_id", code="not_found")
        return f"{self.root}/{file_id}"

    @contextlib.contextmanager
    def writer(self, file_id: str) -> Iterator[IO[bytes]]:
        """A stream to write a file's bytes to; a write that fails or is abandoned leaves
        nothing behind."""
        path = self._path(file_id)
        with self._failures_are_unavailable("writing a file to"):
            if self._local:
                self._fs.makedirs(self.root, exist_ok=True)
            stream = self._fs.open(path, "wb")
        try:
            yield stream
            with self._failures_are_unavailable("writing a file to"):
                stream.close()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.close()
            self.delete(file_id)
            raise

    def lines(self, file_id: str) -> Iterator[bytes]:
        with self._failures_are_unavailable("reading a file from"), self._fs.open(self._path(file_id), "rb") as stream:
            yield from stream

    def chunks(self, file_id: str) -> Iterator[bytes]:
        with self._failures_are_unavailable("reading a file from"), self._fs.open(self._path(file_id), "rb") as stream:
            while chunk := stream.read(READ_CHUNK):
                yield chunk

    def read(self, file_id: str) -> bytes:
        with self._failures_are_unavailable("reading a file from"):
            return self._fs.cat_file(self._path(file_id))

    def delete(self, file_id: str) -> None:
        with self._failures_are_unavailable("deleting a file from"), contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(file_id))

    @contextlib.contextmanager
    def _failures_are_unavailable(self, action: str) -> Iterator[None]:
        """As for images: a failing store is a 503 to retry, whose message names no path."""
        failure = OSError if self._local else Exception
        try:
            yield
        except DiffuserError:
            raise
        except FileNotFoundError:
            raise NotFound("the file's contents are gone (expired or deleted)", param="file_id",
                           code="not_found") from None
        except failure as error:
            logger.exception("%s %s failed", action, self.root)
            raise Unavailable("The file store is unavailable; try again shortly.",
                              retry_after=STORE_RETRY_AFTER_S) from error
