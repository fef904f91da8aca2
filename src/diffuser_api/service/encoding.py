"""Encodes output images in the format and compression the client asked for."""

from __future__ import annotations

import io

from PIL.Image import Image

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image, output_format: str, compression: int | None, *, quick: bool = False) -> bytes:
    """``compression`` is OpenAI's 0-100 (100 = best quality); PNG is always lossless.

    ``quick`` trades file size for speed (PNG zlib level 1), for previews that are shown once.
    """
    buffer = io.BytesIO()
    options: dict[str, object] = {"compress_level": 1} if quick and output_format == "png" else {}
    if output_format in ("jpeg", "webp"):
        options["quality"] = max(1, 100 if compression is None else compression)
    image.save(buffer, format=PIL_FORMATS[output_format], **options)
    return buffer.getvalue()
