"""Encodes output images in the format and compression the client asked for."""

from __future__ import annotations

import io

from PIL.Image import Image

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image, output_format: str, compression: int | None) -> bytes:
    """``compression`` is OpenAI's 0-100 (100 = best quality); PNG is always lossless."""
    buffer = io.BytesIO()
    options: dict[str, object] = {}
    if output_format in ("jpeg", "webp"):
        options["quality"] = max(1, 100 if compression is None else compression)
    image.save(buffer, format=PIL_FORMATS[output_format], **options)
    return buffer.getvalue()
