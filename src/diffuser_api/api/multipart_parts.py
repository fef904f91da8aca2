"""Reads a multipart/form-data body part by part: what the image forms and file uploads share.

python-multipart's streaming parser hands over a part's headers in pieces and its bytes chunk
by chunk. This module collects each part's headers, reads its name and filename from its
Content-Disposition, and refuses a body that is malformed or ends before its closing boundary;
what a part means, and where its bytes go (memory for an image, the store for a 200 MB file),
is the caller's ``PartSink``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from diffuser_api.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MULTIPART = "multipart/form-data"


class PartSink(Protocol):
    """Where a form's parts go; each method may raise the client's error (a cap, a bad name)."""

    def begin(self, name: str, filename: str | None) -> None:
        """A part's headers are read: ``filename`` is None when its Content-Disposition has none."""

    def data(self, chunk: bytes) -> None: ...

    def end(self) -> None: ...


def wrong_content_type(content_type: str) -> InvalidRequest:
    return InvalidRequest(f"this endpoint takes multipart/form-data, not '{content_type or 'no content type'}'",
                          code="invalid_content_type")


async def read_parts(request: Request, content_type: str, sink: PartSink,
                     after_chunk: Callable[[], Awaitable[None]] | None = None) -> None:
    """Parse the body to its closing boundary into ``sink``; ``after_chunk`` runs after each chunk
    read from the socket (the parser's callbacks cannot await, so writing out waits for it)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest("the multipart/form-data content type has no boundary", code="invalid_multipart")
    heads = _PartHeads(sink)
    try:
        parser = MultipartParser(boundary, heads.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            if after_chunk is not None:
                await after_chunk()
    except FormParserError:
        raise InvalidRequest("the multipart/form-data body is malformed", code="invalid_multipart") from None
    if not heads.ended:
        raise InvalidRequest("the multipart/form-data body ends before its closing boundary",
                             code="invalid_multipart")


def grow_capped(buffer: bytearray, chunk: bytes, limit: int, *, param: str, what: str) -> None:
    """Append a chunk to a part kept in memory, refusing it as soon as it passes its cap."""
    buffer.extend(chunk)
    if len(buffer) > limit:
        raise PayloadTooLarge(f"{what} is larger than {limit} bytes, the limit", param=param,
                              code="payload_too_large")


def text_of(param: str, data: bytes | bytearray) -> str:
    """A text field's value: form fields are UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"'{param}' is not UTF-8 text", param=param, code="invalid_value") from None


class _PartHeads:
    """python-multipart's callbacks: collects each part's headers, then hands the sink its
    name and filename, its bytes and its end."""

    def __init__(self, sink: PartSink) -> None:
        self._sink = sink
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self._sink.data(bytes(data[start:end])),
            "on_part_end": self._sink.end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequest("a multipart part has no name in its Content-Disposition", code="invalid_multipart")
        filename = options.get(b"filename")
        self._sink.begin(options[b"name"].decode("utf-8", "replace"),
                         None if filename is None else filename.decode("utf-8", "replace"))

    def _end(self) -> None:
        self.ended = True
