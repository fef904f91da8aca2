"""Reads a ``POST /v1/files`` multipart body, streaming its ``file`` part to the store.

Unlike the image forms (kept in memory, a few MB), a file may be 200 MB: python-multipart's
streaming parser hands over the ``file`` part chunk by chunk, and each chunk read from the
socket is written to the store before the next one is read. The text fields (``purpose``,
``expires_after[anchor]``, ``expires_after[seconds]`` as the SDKs send them) are small and
kept; the body as a whole is capped by the body-limit middleware (``max_file_bytes``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from diffuser_api.api.forms import MULTIPART
from diffuser_api.errors import InvalidRequest, PayloadTooLarge
from diffuser_api.jobs.file_service import FileService, FileUpload

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_PART = "file"
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
MAX_FIELD_BYTES = 1024


class FileForm:
    """python-multipart's callbacks: the file part's bytes wait in ``pending`` until the reader
    writes them out (the callbacks cannot await), the text fields are collected."""

    def __init__(self, files: FileService) -> None:
        self._files = files
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
        self._value = bytearray()
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.pending: list[bytes] = []
        self.upload: FileUpload | None = None
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._value = bytearray()

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequest("a multipart part has no name in its Content-Disposition", code="invalid_multipart")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == FILE_PART:
            if self.filename is not None:
                raise InvalidRequest("send one 'file' part", param="file", code="invalid_value")
            self.filename = options.get(b"filename", b"upload").decode("utf-8", "replace")
        elif self._name not in FIELDS:
            raise InvalidRequest(f"unknown field '{self._name}'; send file, purpose and optionally expires_after",
                                 param=self._name, code="unknown_parameter")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == FILE_PART:
            self.pending.append(bytes(data[start:end]))
            return
        self._value.extend(data[start:end])
        if len(self._value) > MAX_FIELD_BYTES:
            raise PayloadTooLarge(f"the field '{self._name}' is larger than {MAX_FIELD_BYTES} bytes",
                                  param=self._name, code="payload_too_large")

    def _part_end(self) -> None:
        if self._name == FILE_PART:
            return
        try:
            value = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"'{self._name}' is not UTF-8 text", param=self._name, code="invalid_value") from None
        self.fields[self._name] = value
        if self._name == "purpose" and self.upload is not None:
            self.upload.purpose = FileService.purpose_of(value)

    def _end(self) -> None:
        self.ended = True


async def read_file_form(request: Request, form: FileForm, upload: FileUpload) -> None:
    """Parse the body to its end, writing the file part to ``upload`` as it arrives."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(MULTIPART):
        raise InvalidRequest(f"this endpoint takes multipart/form-data, not '{content_type or 'no content type'}'",
                             code="invalid_content_type")
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest("the multipart/form-data content type has no boundary", code="invalid_multipart")
    form.upload = upload
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if form.pending:
                data, form.pending = b"".join(form.pending), []
                await asyncio.to_thread(upload.write, data)
    except FormParserError:
        raise InvalidRequest("the multipart/form-data body is malformed", code="invalid_multipart") from None
    if not form.ended:
        raise InvalidRequest("the multipart/form-data body ends before its closing boundary", code="invalid_multipart")
    if form.filename is None:
        raise InvalidRequest("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
