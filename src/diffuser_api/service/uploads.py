"""Turns uploaded bytes into clean RGB images and diffusers masks, refusing what is unsafe.

Clients send ``application/octet-stream`` and made-up filenames, so only the bytes count:
Pillow sniffs them. Headers are read before pixels, so a decompression bomb is refused
before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffuser_api.errors import InvalidRequest, PayloadTooLarge

SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
READABLE = "PNG, JPEG, WebP, GIF, BMP or TIFF"


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_pixels: int


def decode_image(data: bytes, *, param: str, limits: UploadLimits) -> Image.Image:
    """An upload as an upright RGB image (first frame of an animation)."""
    return _to_rgb(_open(data, param, limits))


def decode_mask(data: bytes, *, image_size: tuple[int, int], limits: UploadLimits) -> Image.Image:
    """OpenAI's mask (transparent = change this) as diffusers wants it (white = repaint).

    A single-channel mask is taken as already in diffusers' convention.
    """
    mask = _open(data, "mask", limits)
    if mask.size != image_size:
        raise InvalidRequest(
            f"mask is {mask.width}x{mask.height} but the image is {image_size[0]}x{image_size[1]}; they must match",
            param="mask",
            code="invalid_value",
        )
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if "A" in mask.getbands():
        return mask.getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    if mask.mode in ("L", "1"):
        return mask.convert("L")
    if mask.mode in SIXTEEN_BIT_MODES:
        return _sixteen_to_eight(mask)
    raise InvalidRequest(
        f"mask has no alpha channel (mode {mask.mode}); send a PNG whose transparent pixels mark the area "
        "to edit, or a single-channel mask where white marks it",
        param="mask",
        code="invalid_value",
    )


def decode_data_url(url: str, *, param: str) -> bytes:
    """JSON edits carry images as data URLs; fetching remote URLs would let clients make the
    server call arbitrary hosts, so only data URLs are accepted."""
    if not url.startswith("data:"):
        raise InvalidRequest(
            f"{param} must be a base64 data URL (data:image/png;base64,...); remote URLs are not fetched",
            param=param,
            code="invalid_value",
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise InvalidRequest(f"{param} data URL must be base64-encoded", param=param, code="invalid_value")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} data URL is not valid base64", param=param, code="invalid_value") from None


def _open(data: bytes, param: str, limits: UploadLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"{param} is {len(data)} bytes; the limit is {limits.max_bytes} bytes",
            param=param,
            code="payload_too_large",
        )
    if not data:
        raise InvalidRequest(f"{param} is empty", param=param, code="invalid_image")
    bomb = InvalidRequest(
        f"{param} has too many pixels (limit {limits.max_pixels}); refusing a possible decompression bomb",
        param=param,
        code="invalid_image",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_pixels:
                raise bomb
            image.load()
            return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bomb from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidRequest(
            f"{param} is not a readable image ({READABLE}): {error}", param=param, code="invalid_image"
        ) from None


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.uint32)
    return Image.fromarray((values >> 8).clip(0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")
