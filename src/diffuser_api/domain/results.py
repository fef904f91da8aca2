"""What comes back from a model and what the API shapes into an ``ImagesResponse``."""

from __future__ import annotations

from dataclasses import dataclass

from PIL.Image import Image


@dataclass(frozen=True)
class GeneratedImage:
    image: Image
    seed: int
    revised_prompt: str | None = None
    prompt_tokens: int | None = None
    # The image in its request's output format, where the job brought its worker an encoder
    # (see ``engine.job.WorkerEncoders``); None: whoever stores it encodes it.
    encoded: bytes | None = None


@dataclass(frozen=True)
class EncodedPreview:
    """A preview already encoded (base64) on the thread that made it, between two steps."""

    b64_json: str


@dataclass(frozen=True)
class StepProgress:
    """A denoising step finished; ``previews`` (one per output image) when one was due.

    ``previews[i]`` belongs to the request's image ``first_image + i``: a request run as several
    batches reports each batch's previews at its own images. A preview is an image, or already
    encoded where the job brought its worker encoders (see ``engine.job.WorkerEncoders``).
    """

    step: int
    total: int
    previews: tuple[Image | EncodedPreview, ...] | None = None
    first_image: int = 0


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
    # Text tokens of the prompt as the encoder saw them, for OpenAI's ``usage``.
    prompt_tokens: int | None = None
