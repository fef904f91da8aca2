"""What comes back from a model and what the API shapes into an ``ImagesResponse``."""

from __future__ import annotations

from dataclasses import dataclass

from PIL.Image import Image


@dataclass(frozen=True)
class GeneratedImage:
    image: Image
    seed: int
    revised_prompt: str | None = None


@dataclass(frozen=True)
class StoredImage:
    """One output, encoded: base64 text or a URL, never both."""

    seed: int
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True)
class ImagesResult:
    created: int
    images: tuple[StoredImage, ...]
    output_format: str
    size: str
    quality: str | None
    steps: int | None = None
