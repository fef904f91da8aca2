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
from urllib.parse import parse_qsl

from fastapi import Request

from diffuser_api.api.multipart_parts import MULTIPART, grow_capped, read_parts, text_of, wrong_content_type
from diffuser_api.config import Settings
from diffuser_api.domain import Upload
from diffuser_api.errors import InvalidRequest

IMAGE_PARTS = ("image", "image[]")
FILE_PARTS = (*IMAGE_PARTS, "mask")
MAX_IMAGES = 16
MAX_FIELDS = 100
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
    raise wrong_content_type(content_type)


async def _read_multipart(request: Request, content_type: str, settings: Settings) -> ParsedForm:
    # A text field is never larger than a whole JSON body of the small routes.
    parts = PartCollector(max_upload_bytes=settings.max_upload_bytes, max_field_bytes=settings.max_json_bytes)
    await read_parts(request, content_type, parts)
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
    data: bytearray = field(default_factory=bytearray)


class PartCollector:
    """A ``PartSink`` that keeps each part in memory, its cap checked as it grows."""

    def __init__(self, *, max_upload_bytes: int, max_field_bytes: int) -> None:
        self._max_upload_bytes = max_upload_bytes
        self._max_field_bytes = max_field_bytes
        self._part = Part()
        self.fields: dict[str, str] = {}
        self.images: list[Upload] = []
        self.mask: Upload | None = None
        self._field_count = 0

    def form(self) -> ParsedForm:
        return ParsedForm(fields=self.fields, images=tuple(self.images), mask=self.mask)

    def begin(self, name: str, filename: str | None) -> None:
        self._part = Part(name=name)
        if name in IMAGE_PARTS and len(self.images) >= MAX_IMAGES:
            raise InvalidRequest(f"at most {MAX_IMAGES} images per request", param="image", code="invalid_value")
        if name not in FILE_PARTS:
            if filename is not None:
                raise InvalidRequest(f"'{name}' must be a text field, not a file", param=name, code="invalid_value")
            self._field_count += 1
            if self._field_count > MAX_FIELDS:
                raise InvalidRequest(f"at most {MAX_FIELDS} form fields per request", code="invalid_value")

    def data(self, chunk: bytes) -> None:
        part = self._part
        param = part.name.removesuffix("[]")
        if part.name in FILE_PARTS:
            grow_capped(part.data, chunk, self._max_upload_bytes, param=param, what=param)
        else:
            grow_capped(part.data, chunk, self._max_field_bytes, param=param, what=f"the field '{param}'")

    def end(self) -> None:
        part = self._part
        param = part.name.removesuffix("[]")
        if part.name in FILE_PARTS:
            upload = Upload(param=param, data=bytes(part.data))
            if part.name == "mask":
                self.mask = upload
            else:
                self.images.append(upload)
            return
        self.fields[param] = text_of(param, part.data)
