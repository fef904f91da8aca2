"""Turns uploaded bytes into clean RGB images and diffusers masks, refusing what is unsafe.

Clients send ``application/octet-stream`` and made-up filenames, so only the bytes count:
Pillow sniffs them, among the few formats we accept (Pillow knows dozens, some of which hand
the bytes to outside programs such as Ghostscript). ``Image.open`` reads only the header, so
sizes are checked against our limits before a single pixel is decoded, and only the first
frame of an animation or multi-page file ever is. Pillow's own messages never reach the
client: they may hold memory addresses and say nothing useful about the request.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffuser_api.errors import InvalidRequest, PayloadTooLarge

logger = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# No side of an upload may be longer (JPEG and WebP stop below it anyway): a 1 x 16-million
# strip fits the pixel limit but is no picture to edit.
MAX_INPUT_SIDE = 16384
# What Pillow raises on bytes it cannot parse or decode, format by format.
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_pixels: int
    max_side: int = MAX_INPUT_SIDE

    def __post_init__(self) -> None:
        # Pillow refuses images above twice its MAX_IMAGE_PIXELS while opening them, before our
        # check; a limit above that would be Pillow's, not the one the settings state.
        pillow_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        if pillow_limit is not None and self.max_pixels > pillow_limit:
            raise ValueError(
                f"max_input_pixels {self.max_pixels} is above {pillow_limit}, where Pillow refuses images itself"
            )


def decode_image(
    data: bytes, *, param: str, limits: UploadLimits, at_least: int | None = None
) -> Image.Image:
    """An upload as an upright RGB image (first frame of an animation).

    ``at_least``: the longest side the caller needs, when it will shrink the image anyway; a
    JPEG is then decoded at a reduced scale (1/2, 1/4 or 1/8) whose sides all still cover it.
    """
    image = _open(data, param, limits)
    if at_least is not None:
        image.draft(None, (at_least, at_least))
    return _to_rgb(_decode(image, param))


def decode_mask(data: bytes, *, image_size: tuple[int, int], limits: UploadLimits) -> Image.Image:
    """OpenAI's mask (transparent = change this) as diffusers wants it (white = repaint).

    A single-channel mask is taken as already in diffusers' convention. Its size is compared
    with the image's from its header, before its pixels are decoded: only an EXIF rotation may
    still turn it, so the header may show the image's size either way round.
    """
    mask = _open(data, "mask", limits)
    if mask.size not in (image_size, image_size[::-1]):
        raise _mask_size_mismatch(mask.size, image_size)
    mask = _decode(mask, "mask")
    if mask.size != image_size:
        raise _mask_size_mismatch(mask.size, image_size)
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
    """The upload with its header read and checked; no pixel is decoded yet."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"{param} is {len(data)} bytes; the limit is {limits.max_bytes} bytes",
            param=param,
            code="payload_too_large",
        )
    if not data:
        raise InvalidRequest(f"{param} is empty", param=param, code="invalid_image")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check fired first: its error is above our limit (see UploadLimits), its
        # warning is raised only where warnings are made errors. Either way the client is told
        # our limit, the one the settings state.
        raise _too_many_pixels(param, limits) from None
    except UNREADABLE as error:
        raise _unreadable(param, error) from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _too_many_pixels(param, limits)
    if max(width, height) > limits.max_side:
        raise InvalidRequest(
            f"{param} is {width}x{height}; no side of an upload may be over {limits.max_side} pixels",
            param=param,
            code="invalid_image",
        )
    return image


def _decode(image: Image.Image, param: str) -> Image.Image:
    """The pixels of the first frame, turned upright by the EXIF orientation."""
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except UNREADABLE as error:
        raise _unreadable(param, error) from None


def _too_many_pixels(param: str, limits: UploadLimits) -> InvalidRequest:
    return InvalidRequest(
        f"{param} has too many pixels (limit {limits.max_pixels}); refusing a possible decompression bomb",
        param=param,
        code="invalid_image",
    )


def _unreadable(param: str, error: Exception) -> InvalidRequest:
    logger.debug("%s is not a readable image: %r", param, error)
    return InvalidRequest(
        f"{param} is not a readable image; accepted formats are {ACCEPTED}", param=param, code="invalid_image"
    )


def _mask_size_mismatch(mask_size: tuple[int, int], image_size: tuple[int, int]) -> InvalidRequest:
    return InvalidRequest(
        f"mask is {mask_size[0]}x{mask_size[1]} but the image is {image_size[0]}x{image_size[1]}; they must match",
        param="mask",
        code="invalid_value",
    )


def _sixteen_to_eight(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.uint32)
    return Image.fromarray((values >> 8).clip(0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")
