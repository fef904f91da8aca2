"""Reads multipart bodies the way OpenAI clients write them.

One file is ``image``, a list is ``image[]`` per file (some clients repeat ``image``), the
mask is ``mask``; every other value arrives as a string for pydantic to coerce.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile

from diffuser_api.domain import Upload
from diffuser_api.errors import InvalidRequest, PayloadTooLarge

IMAGE_PARTS = ("image", "image[]")
MAX_IMAGES = 16
# A form without files (url-encoded) can still be answered precisely: "image is missing".
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class ParsedForm:
    fields: dict[str, str]
    images: tuple[Upload, ...]
    mask: Upload | None


async def read_image_form(request: Request, max_upload_bytes: int) -> ParsedForm:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(FORM_TYPES):
        raise InvalidRequest(
            f"this endpoint takes multipart/form-data, not '{content_type or 'no content type'}'",
            code="invalid_content_type",
        )
    form = await request.form(max_files=MAX_IMAGES + 1, max_fields=100)
    fields: dict[str, str] = {}
    images: list[Upload] = []
    mask: Upload | None = None
    for key, value in form.multi_items():
        if key in IMAGE_PARTS or key == "mask":
            upload = await _read_file(key, value, max_upload_bytes)
            if key == "mask":
                mask = upload
            else:
                images.append(upload)
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"'{key}' must be a text field, not a file", param=key, code="invalid_value")
        else:
            fields[key.removesuffix("[]")] = value
    if len(images) > MAX_IMAGES:
        raise InvalidRequest(f"at most {MAX_IMAGES} images per request", param="image", code="invalid_value")
    return ParsedForm(fields=fields, images=tuple(images), mask=mask)


async def _read_file(key: str, value: UploadFile | str, max_upload_bytes: int) -> Upload:
    param = key.removesuffix("[]")
    if not isinstance(value, UploadFile):
        raise InvalidRequest(f"'{param}' must be a file upload", param=param, code="invalid_value")
    if value.size is not None and value.size > max_upload_bytes:
        raise PayloadTooLarge(
            f"{param} is {value.size} bytes; the limit is {max_upload_bytes} bytes", param=param,
            code="payload_too_large",
        )
    return Upload(param=param, data=await value.read())
