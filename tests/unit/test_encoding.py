"""Outputs come back in the format asked for, and output_compression trades size for quality."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffuser_api.service.encoding import encode_image


def noisy_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
@pytest.mark.parametrize("compression", [None, 0, 50, 100])
def test_encoded_image_reads_back_in_its_format(output_format: str, pil_format: str, compression: int | None) -> None:
    source = noisy_image()
    decoded = Image.open(io.BytesIO(encode_image(source, output_format, compression)))
    assert decoded.format == pil_format
    assert decoded.size == source.size


def test_png_is_lossless() -> None:
    source = noisy_image()
    decoded = Image.open(io.BytesIO(encode_image(source, "png", 10)))
    assert np.array_equal(np.asarray(decoded), np.asarray(source))


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_lower_output_compression_gives_a_smaller_file(output_format: str) -> None:
    source = noisy_image()
    sizes = [len(encode_image(source, output_format, compression)) for compression in (10, 50, 100)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert len(encode_image(source, output_format, None)) == sizes[2]
