"""Uploads: every readable format becomes upright RGB, masks follow diffusers, and bad or
dangerous bytes are 400/413 with the field named."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, GifImagePlugin, Image, ImageFile, PngImagePlugin, TiffImagePlugin, WebPImagePlugin

from diffuser_api.errors import InvalidRequest, PayloadTooLarge
from diffuser_api.service.uploads import UploadLimits, decode_data_url, decode_image, decode_mask

ACCEPTED_MESSAGE = "is not a readable image; accepted formats are PNG, JPEG, WebP, GIF, BMP or TIFF"
# A complete EPS file: Pillow reads its bounding box, then would run Ghostscript for the pixels.
MINIMAL_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'

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


@pytest.mark.parametrize(
    ("fmt", "plugin"),
    [
        ("GIF", GifImagePlugin.GifImageFile),
        ("TIFF", TiffImagePlugin.TiffImageFile),
        ("PNG", PngImagePlugin.PngImageFile),
        ("WEBP", WebPImagePlugin.WebPImageFile),
    ],
)
def test_only_the_first_frame_is_ever_read(monkeypatch: pytest.MonkeyPatch, fmt: str, plugin: type) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    frames_read: list[int] = []
    read_frame = plugin._seek

    def recording_seek(self: Image.Image, frame: int, *args: object, **kwargs: object) -> None:
        frames_read.append(frame)
        read_frame(self, frame, *args, **kwargs)

    monkeypatch.setattr(plugin, "_seek", recording_seek)
    red, green, blue = decode_image(data, param="image", limits=LIMITS).getpixel((4, 4))
    assert red > 200 and green < 40 and blue < 40
    assert set(frames_read) <= {0}


def test_bmp_and_tiff_are_accepted() -> None:
    for fmt in ("BMP", "TIFF"):
        image = decode_image(encode(Image.new("RGB", (6, 4), (1, 2, 3)), fmt), param="image", limits=LIMITS)
        assert (image.size, image.getpixel((0, 0))) == ((6, 4), (1, 2, 3))


def test_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_output() -> None:
    data = encode(Image.new("RGB", (1024, 768), (0, 120, 240)), "JPEG")
    assert decode_image(data, param="image", limits=LIMITS).size == (1024, 768)
    for at_least, size in ((192, (256, 192)), (256, (512, 384)), (385, (1024, 768))):
        image = decode_image(data, param="image", limits=LIMITS, at_least=at_least)
        assert image.size == size and min(image.size) >= at_least
        red, green, blue = image.getpixel((size[0] // 2, size[1] // 2))
        assert red < 20 and 100 < green < 140 and blue > 220
    png = encode(Image.new("RGB", (1024, 768)), "PNG")
    assert decode_image(png, param="image", limits=LIMITS, at_least=256).size == (1024, 768)


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
    assert caught.value.message == "image[] " + ACCEPTED_MESSAGE


def disallowed_formats() -> list:
    """Formats Pillow reads (shown by opening each without our list) that uploads may not use."""
    made = [
        pytest.param(encode(Image.new("RGB", (16, 16), (9, 9, 9)), fmt), fmt, id=fmt)
        for fmt in ("PCX", "ICO", "TGA", "PPM", "SGI", "DDS", "QOI", "EPS")
    ]
    return [*made, pytest.param(MINIMAL_EPS, "EPS", id="minimal-eps-text")]


@pytest.mark.parametrize(("data", "fmt"), disallowed_formats())
def test_formats_pillow_knows_but_we_do_not_accept_are_refused(
    monkeypatch: pytest.MonkeyPatch, data: bytes, fmt: str
) -> None:
    assert Image.open(io.BytesIO(data)).format == fmt

    def ghostscript_reached(self: ImageFile.ImageFile) -> None:
        raise AssertionError("the EPS reader ran: the next step is Ghostscript")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript_reached)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, param="image", limits=LIMITS)
    assert (caught.value.param, caught.value.code) == ("image", "invalid_image")
    assert caught.value.message == "image " + ACCEPTED_MESSAGE


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(SVG, id="svg"),
        pytest.param(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), id="random-bytes"),
    ],
)
def test_svg_and_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_mask(data, image_size=(10, 10), limits=LIMITS)
    assert (caught.value.param, caught.value.message) == ("mask", "mask " + ACCEPTED_MESSAGE)


def test_pillows_words_are_logged_not_returned(caplog: pytest.LogCaptureFixture) -> None:
    truncated = noisy_png()[: len(noisy_png()) // 2]
    with caplog.at_level("DEBUG", logger="diffuser_api.service.uploads"), pytest.raises(InvalidRequest) as caught:
        decode_image(truncated, param="image", limits=LIMITS)
    assert "truncated" not in caught.value.message and "0x" not in caught.value.message
    assert any("image" in record.getMessage() and "truncated" in record.getMessage() for record in caplog.records)


def test_empty_upload_is_invalid() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_image(b"", param="image", limits=LIMITS)
    assert caught.value.param == "image"
    assert "empty" in caught.value.message


def test_oversized_upload_is_payload_too_large() -> None:
    data = noisy_png()
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(data, param="image", limits=UploadLimits(max_bytes=len(data) - 1, max_pixels=10**8))
    assert caught.value.param == "image"
    assert str(len(data) - 1) in caught.value.message


def no_decoding(self: ImageFile.ImageFile) -> None:
    raise AssertionError("pixels were decoded")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
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
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, param="image", limits=UploadLimits(max_bytes=10**7, max_pixels=max_pixels))
    assert caught.value.param == "image"
    assert caught.value.code == "invalid_image"
    assert "decompression bomb" in caught.value.message


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_is_told_our_limit_where_pillows_warning_is_an_error() -> None:
    limits = UploadLimits(max_bytes=10**7, max_pixels=64 * 1024 * 1024)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(bilevel_png(10_000, 10_000, with_pixels=False), param="image", limits=limits)
    assert f"limit {64 * 1024 * 1024}" in caught.value.message


def test_pillows_own_threshold_is_not_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are the one source: Pillow only warns between its threshold and ours."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    limits = UploadLimits(max_bytes=10**6, max_pixels=2000)
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(bilevel_png(40, 40), param="image", limits=limits).size == (40, 40)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(bilevel_png(60, 60), param="image", limits=limits)
    assert "limit 2000" in caught.value.message


def test_a_limit_pillow_would_override_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="max_input_pixels"):
        UploadLimits(max_bytes=10**6, max_pixels=2 * Image.MAX_IMAGE_PIXELS + 1)


def test_a_side_too_long_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InvalidRequest) as caught:
        decode_image(bilevel_png(20_000, 8), param="image", limits=LIMITS)
    assert (caught.value.param, caught.value.code) == ("image", "invalid_image")
    assert "20000x8" in caught.value.message and "16384" in caught.value.message


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


def test_mask_of_another_size_is_refused_before_its_pixels_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bilevel_png(4000, 3000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(InvalidRequest) as caught:
        decode_mask(data, image_size=(40, 30), limits=LIMITS)
    assert caught.value.param == "mask"
    assert "4000x3000" in caught.value.message and "40x30" in caught.value.message


def test_mask_turned_upright_by_exif_matches_the_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 6x4, shown 4x6
    source = Image.new("RGBA", (6, 4), (0, 0, 0, 255))
    source.putpixel((0, 0), (0, 0, 0, 0))
    data = encode(source, "PNG", exif=exif)
    mask = decode_mask(data, image_size=(4, 6), limits=LIMITS)
    assert mask.size == (4, 6) and mask.getpixel((3, 0)) == 255
    with pytest.raises(InvalidRequest) as caught:
        decode_mask(encode(source, "PNG"), image_size=(4, 6), limits=LIMITS)  # no EXIF: really 6x4
    assert "6x4" in caught.value.message


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
