"""Reads multipart bodies the way OpenAI clients write them.

One file is ``image``, a list is ``image[]`` per file (some clients repeat ``image``), the
mask is ``mask``; every other value arrives as a string for pydantic to coerce.

The part's name alone says what it is: an image or mask part is kept as its raw bytes whether
or not it has a filename and whatever content type it claims (httpx sends
``files={"image": (None, data, ...)}`` with no filename, and a filename may lie), and the
upload decoder sniffs the bytes. python-multipart's streaming parser reads ``request.stream()``
directly, because starlette's ``request.form()`` decodes filename-less parts as text (which
corrupts binary data) and spools files to disk; here every part stays in memory, capped as it
grows, and the body as a whole is capped by the body-limit middleware.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from diffuser_api.config import Settings
from diffuser_api.domain import Upload
from diffuser_api.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

IMAGE_PARTS = ("image", "image[]")
FILE_PARTS = (*IMAGE_PARTS, "mask")
MAX_IMAGES = 16
MAX_FIELDS = 100
MULTIPART = "multipart/form-data"
# A form without files (url-encoded) can still be answered precisely: "image is missing".
URLENCODED = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class ParsedForm:
    fields: dict[str, str]
    images: tuple[Upload, ...]
    mask: Upload | None


async def read_image_form(request: Request, settings: Settings) -> ParsedForm:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(MULTIPART):
        return await _read_multipart(request, content_type, settings)
    if content_type.startswith(URLENCODED):
        return await _read_urlencoded(request)
    raise InvalidRequest(
        f"this endpoint takes multipart/form-data, not '{content_type or 'no content type'}'",
        code="invalid_content_type",
    )


async def _read_multipart(request: Request, content_type: str, settings: Settings) -> ParsedForm:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest("the multipart/form-data content type has no boundary", code="invalid_multipart")
    # A text field is never larger than a whole JSON body of the small routes.
    parts = PartCollector(max_upload_bytes=settings.max_upload_bytes, max_field_bytes=settings.max_json_bytes)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
    except FormParserError:
        raise InvalidRequest("the multipart/form-data body is malformed", code="invalid_multipart") from None
    if not parts.ended:
        raise InvalidRequest("the multipart/form-data body ends before its closing boundary",
                             code="invalid_multipart")
    return parts.form()


async def _read_urlencoded(request: Request) -> ParsedForm:
    """Text fields only: such a form cannot carry a file."""
    try:
        pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest(f"the form is not UTF-8 text with at most {MAX_FIELDS} fields",
                             code="invalid_value") from None
    for key, _ in pairs:
        if key in FILE_PARTS:
            param = key.removesuffix("[]")
            raise InvalidRequest(f"send '{param}' as a part of a multipart/form-data body",
                                 param=param, code="invalid_content_type")
    return ParsedForm(fields={key.removesuffix("[]"): value for key, value in pairs}, images=(), mask=None)


@dataclass
class Part:
    name: str = ""
    has_filename: bool = False
    data: bytearray = field(default_factory=bytearray)


class PartCollector:
    """python-multipart's callbacks: each part lands in memory, its cap checked as it grows."""

    def __init__(self, *, max_upload_bytes: int, max_field_bytes: int) -> None:
        self._max_upload_bytes = max_upload_bytes
        self._max_field_bytes = max_field_bytes
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part = Part()
        self.fields: dict[str, str] = {}
        self.images: list[Upload] = []
        self.mask: Upload | None = None
        self._field_count = 0
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

    def form(self) -> ParsedForm:
        return ParsedForm(fields=self.fields, images=tuple(self.images), mask=self.mask)

    def _part_begin(self) -> None:
        self._part = Part()
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequest("a multipart part has no name in its Content-Disposition",
                                 code="invalid_multipart")
        self._part.name = options[b"name"].decode("utf-8", "replace")
        self._part.has_filename = b"filename" in options
        name = self._part.name
        if name in IMAGE_PARTS and len(self.images) >= MAX_IMAGES:
            raise InvalidRequest(f"at most {MAX_IMAGES} images per request", param="image", code="invalid_value")
        if name not in FILE_PARTS:
            if self._part.has_filename:
                raise InvalidRequest(f"'{name}' must be a text field, not a file", param=name, code="invalid_value")
            self._field_count += 1
            if self._field_count > MAX_FIELDS:
                raise InvalidRequest(f"at most {MAX_FIELDS} form fields per request", code="invalid_value")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.data.extend(data[start:end])
        is_file = part.name in FILE_PARTS
        limit = self._max_upload_bytes if is_file else self._max_field_bytes
        if len(part.data) > limit:
            param = part.name.removesuffix("[]")
            what = param if is_file else f"the field '{param}'"
            raise PayloadTooLarge(f"{what} is larger than {limit} bytes, the limit", param=param,
                                  code="payload_too_large")

    def _part_end(self) -> None:
        part = self._part
        param = part.name.removesuffix("[]")
        if part.name in FILE_PARTS:
            upload = Upload(param=param, data=bytes(part.data))
            if part.name == "mask":
                self.mask = upload
            else:
                self.images.append(upload)
            return
        try:
            self.fields[param] = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"'{param}' is not UTF-8 text", param=param, code="invalid_value") from None

    def _end(self) -> None:
        self.ended = True
