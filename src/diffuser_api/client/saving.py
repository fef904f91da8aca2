"""Writing the images: ``<prefix>-<seed>.<format>`` in the output folder.

Named by seed so a file says how to make it again (``--seed``), and two images of one request
(consecutive seeds) never overwrite each other.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

FORMATS = ("png", "jpeg", "webp")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class SavedImage:
    path: Path
    seed: int
    revised_prompt: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"file": str(self.path), "seed": self.seed, "revised_prompt": self.revised_prompt}


def image_path(directory: Path, prefix: str, seed: int, output_format: str) -> Path:
    return directory / f"{prefix}-{seed}.{output_format}"


def save_image(
    b64_json: str, seed: int, directory: Path, prefix: str, output_format: str, *,
    received_format: str | None = None, revised_prompt: str | None = None,
) -> SavedImage:
    """Write one image. ``received_format``: what the server encoded, when it could not encode
    ``output_format`` itself (variations take no ``output_format``); the image is re-encoded here."""
    data = base64.b64decode(b64_json)
    if received_format is not None and received_format != output_format:
        data = reencoded(data, output_format)
    directory.mkdir(parents=True, exist_ok=True)
    path = image_path(directory, prefix, seed, output_format)
    path.write_bytes(data)
    return SavedImage(path, seed, revised_prompt)


def reencoded(data: bytes, output_format: str) -> bytes:
    image = Image.open(io.BytesIO(data))
    if output_format == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha channel
    buffer = io.BytesIO()
    image.save(buffer, format=PIL_FORMATS[output_format])
    return buffer.getvalue()
