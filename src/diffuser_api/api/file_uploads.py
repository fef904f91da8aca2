"""Reads a ``POST /v1/files`` multipart body, streaming its ``file`` part to the store.

Unlike the image forms (kept in memory, a few MB), a file may be 200 MB: python-multipart's
streaming parser hands over the ``file`` part chunk by chunk, and each chunk read from the
socket is written to the store before the next one is read. The text fields (``purpose``,
``expires_after[anchor]``, ``expires_after[seconds]`` as the SDKs send them) are small and
kept; the body as a whole is capped by the body-limit middleware (``max_file_bytes``).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from diffuser_api.api.multipart_parts import MULTIPART, grow_capped, read_parts, text_of, wrong_content_type
from diffuser_api.errors import InvalidRequest
from diffuser_api.jobs.file_service import FileService, FileUpload

FILE_PART = "file"
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
MAX_FIELD_BYTES = 1024


class FileForm:
    """A ``PartSink``: the file part's bytes wait in ``pending`` until the reader writes them out
    (the parser's callbacks cannot await), the text fields are collected."""

    def __init__(self) -> None:
        self._name = ""
        self._value = bytearray()
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.pending: list[bytes] = []
        self.upload: FileUpload | None = None

    def begin(self, name: str, filename: str | None) -> None:
        self._name = name
        self._value = bytearray()
        if name == FILE_PART:
            if self.filename is not None:
                raise InvalidRequest("send one 'file' part", param="file", code="invalid_value")
            self.filename = "upload" if filename is None else filename
        elif name not in FIELDS:
            raise InvalidRequest(f"unknown field '{name}'; send file, purpose and optionally expires_after",
                                 param=name, code="unknown_parameter")

    def data(self, chunk: bytes) -> None:
        if self._name == FILE_PART:
            self.pending.append(chunk)
        else:
            grow_capped(self._value, chunk, MAX_FIELD_BYTES, param=self._name, what=f"the field '{self._name}'")

    def end(self) -> None:
        if self._name == FILE_PART:
            return
        value = text_of(self._name, self._value)
        self.fields[self._name] = value
        if self._name == "purpose" and self.upload is not None:
            self.upload.purpose = FileService.purpose_of(value)


async def read_file_form(request: Request, form: FileForm, upload: FileUpload) -> None:
    """Parse the body to its end, writing the file part to ``upload`` as it arrives."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(MULTIPART):
        raise wrong_content_type(content_type)
    form.upload = upload

    async def write_pending() -> None:
        if form.pending:
            data, form.pending = b"".join(form.pending), []
            await asyncio.to_thread(upload.write, data)

    await read_parts(request, content_type, form, after_chunk=write_pending)
    if form.filename is None:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
