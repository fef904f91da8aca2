"""Uploads: every readable format becomes upright RGB, masks follow diffusers, and bad or
dangerous bytes are 400/413 with the field named."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffuser_api.errors import InvalidRequest, PayloadTooLarge
from diffuser_api.service.uploads import UploadLimits, decode_data_url, decode_image, decode_mask

LIMITS = UploadLimits(max_bytes=10 * 1024 * 1024, max_pixels=64 * 1024 * 1024)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int, *, with_pixels: bool = True) -> bytes:
    """An all-black 1-bit PNG built without Pillow, so a huge one costs only its few KB.

    Without pixels it is just the header, which is all a bomb check may read.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = b""
    if with_pixels:
        row = b"\x00" * (1 + (width + 7) // 8)
        compressor = zlib.compressobj(9)
        body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def pixels(image: Image.Image) -> list:
    return np.asarray(image).tolist()


# decode_image: formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_common_formats_decode_to_rgb(fmt: str) -> None:
    data = encode(Image.new("RGB", (24, 16), (200, 30, 40)), fmt)
    image = decode_image(data, param="image", limits=LIMITS)
    assert image.mode == "RGB"
    assert image.size == (24, 16)
    red, green, blue = image.getpixel((12, 8))
    assert red > 150 and green < 80 and blue < 80


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    data = encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif)
    assert decode_image(data, param="image", limits=LIMITS).size == (20, 40)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    image = decode_image(data, param="image", limits=LIMITS)
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((4, 4))
    assert red > 150 and green < 80 and blue < 80


def test_sixteen_bit_grayscale_png_keeps_its_range() -> None:
    source = Image.fromarray(np.array([[0, 65535], [256, 32768]], dtype=np.uint16))
    assert source.mode == "I;16"
    image = decode_image(encode(source, "PNG"), param="image", limits=LIMITS)
    assert image.mode == "RGB"
    assert pixels(image) == [[[0, 0, 0], [255, 255, 255]], [[1, 1, 1], [128, 128, 128]]]


def test_palette_png_with_transparency_becomes_rgb() -> None:
    source = Image.new("P", (4, 4), 1)
    source.putpalette([0, 0, 0, 10, 200, 30])
    source.putpixel((0, 0), 0)
    image = decode_image(encode(source, "PNG", transparency=0), param="image", limits=LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == (10, 200, 30)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = decode_image(data, param="image", limits=LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == (255, 0, 0)


# decode_image: refusals


def noisy_png() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, id="corrupt"),
        pytest.param(b"hello, I am not an image at all", id="text"),
        pytest.param(noisy_png()[: len(noisy_png()) // 2], id="truncated-png"),
    ],
)
def test_unreadable_bytes_are_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, param="image[]", limits=LIMITS)
    assert caught.value.param == "image[]"
    assert caught.value.code == "invalid_image"


def test_empty_upload_is_invalid() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_image(b"", param="image", limits=LIMITS)
    assert caught.value.param == "image"
    assert "empty" in caught.value.message


def test_oversized_upload_is_payload_too_large() -> None:
    data = noisy_png()
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(data, param="image", limits=UploadLimits(max_bytes=len(data) - 1, max_pixels=10**9))
    assert caught.value.param == "image"
    assert str(len(data) - 1) in caught.value.message


@pytest.mark.parametrize(
    ("data", "max_pixels"),
    [
        pytest.param(bilevel_png(10_000, 10_000), 64 * 1024 * 1024, id="above-our-limit-and-pillows-warning"),
        pytest.param(bilevel_png(5_000, 5_000), 1_000_000, id="above-our-limit-only"),
        pytest.param(
            bilevel_png(60_000, 60_000, with_pixels=False), 64 * 1024 * 1024, id="above-pillows-hard-limit"
        ),
    ],
)
def test_decompression_bomb_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch, data: bytes, max_pixels: int
) -> None:
    assert len(data) < 600_000  # small file, huge image

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, param="image", limits=UploadLimits(max_bytes=10**7, max_pixels=max_pixels))
    assert caught.value.param == "image"
    assert caught.value.code == "invalid_image"
    assert "decompression bomb" in caught.value.message


def test_image_at_the_pixel_limit_is_accepted() -> None:
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    assert decode_image(data, param="image", limits=UploadLimits(max_bytes=10**6, max_pixels=100)).size == (10, 10)


# decode_mask


def test_rgba_mask_transparent_means_repaint() -> None:
    source = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    source.putpixel((0, 0), (255, 255, 255, 0))
    source.putpixel((1, 1), (10, 10, 10, 0))
    mask = decode_mask(encode(source, "PNG"), image_size=(4, 2), limits=LIMITS)
    assert mask.mode == "L"
    assert pixels(mask) == [[255, 0, 0, 0], [0, 255, 0, 0]]


def test_la_mask_uses_its_alpha() -> None:
    source = Image.new("LA", (2, 2), (128, 255))
    source.putpixel((1, 0), (128, 0))
    mask = decode_mask(encode(source, "PNG"), image_size=(2, 2), limits=LIMITS)
    assert pixels(mask) == [[0, 255], [0, 0]]


def test_palette_mask_with_transparency_uses_it() -> None:
    source = Image.new("P", (2, 2), 1)
    source.putpalette([0, 0, 0, 255, 255, 255])
    source.putpixel((0, 1), 0)
    mask = decode_mask(encode(source, "PNG", transparency=0), image_size=(2, 2), limits=LIMITS)
    assert pixels(mask) == [[0, 0], [255, 0]]


def test_single_channel_mask_passes_through() -> None:
    source = Image.fromarray(np.array([[0, 255], [7, 200]], dtype=np.uint8), "L")
    mask = decode_mask(encode(source, "PNG"), image_size=(2, 2), limits=LIMITS)
    assert mask.mode == "L"
    assert pixels(mask) == [[0, 255], [7, 200]]


def test_rgb_mask_without_alpha_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_mask(encode(Image.new("RGB", (2, 2)), "PNG"), image_size=(2, 2), limits=LIMITS)
    assert caught.value.param == "mask"
    assert "alpha" in caught.value.message


def test_mask_of_another_size_is_refused_with_both_sizes() -> None:
    data = encode(Image.new("RGBA", (4, 6)), "PNG")
    with pytest.raises(InvalidRequest) as caught:
        decode_mask(data, image_size=(8, 10), limits=LIMITS)
    assert caught.value.param == "mask"
    assert "4x6" in caught.value.message and "8x10" in caught.value.message


def test_unreadable_mask_names_the_mask() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_mask(b"not a png", image_size=(2, 2), limits=LIMITS)
    assert caught.value.param == "mask"
    assert caught.value.code == "invalid_image"


# decode_data_url


def test_base64_data_url_gives_its_bytes() -> None:
    data = encode(Image.new("RGB", (3, 3)), "PNG")
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert decode_data_url(url, param="images[0].image_url") == data


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("https://example.com/cat.png", "remote URLs", id="http-url"),
        pytest.param("data:image/png,not-base64-at-all", "base64-encoded", id="not-base64"),
        pytest.param("data:image/png;base64,@@@not*base64!", "not valid base64", id="bad-base64"),
        pytest.param("data:image/png;base64,QUJ", "not valid base64", id="bad-padding"),
    ],
)
def test_bad_data_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_data_url(url, param="images[0].image_url")
    assert caught.value.param == "images[0].image_url"
    assert words in caught.value.message
