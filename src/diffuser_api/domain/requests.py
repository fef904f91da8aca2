"""What a request asks for once the API has parsed it and the service has checked it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from PIL.Image import Image

from diffuser_api.domain.speed import STEP_CACHE_OFF, StepCache

# Seeds are unsigned 32-bit, as most image tools show them; image k of a request uses seed + k.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class LoraChoice:
    """One entry of a request's ``loras``: a registered adapter's name, never a path; ``scale``
    None keeps the adapter's configured scale."""

    name: str
    scale: float | None = None


# (adapter name, scale) pairs sorted by name: one canonical form, so equal sets batch together.
AdapterSet = tuple[tuple[str, float], ...]


class Task(StrEnum):
    """The things a model may or may not be able to do; a missing one is a 501."""

    GENERATION = "generation"
    EDIT = "edit"
    MASKED_EDIT = "masked edit (inpainting)"
    MULTI_IMAGE_EDIT = "edit with several images"
    VARIATION = "variation"


@dataclass(frozen=True)
class ImageJob:
    """One request's work, fully resolved: every default filled, every image decoded.

    ``seeds`` has one entry per output image, so ``n`` is ``len(seeds)``.
    """

    task: Task
    prompt: str
    width: int
    height: int
    steps: int
    seeds: tuple[int, ...]
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    strength: float | None = None
    # Previews wanted per image while it denoises (OpenAI's partial_images, 0-3).
    partial_images: int = 0
    # The LoRA adapters applied to this job (part of the batch key); () is the base model.
    loras: AdapterSet = ()
    # Part of the batch key: a cache decides per pipeline call which steps it skips.
    step_cache: StepCache = STEP_CACHE_OFF
    images: tuple[Image, ...] = field(default=(), compare=False)
    mask: Image | None = field(default=None, compare=False)

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.n


class Endpoint(StrEnum):
    GENERATIONS = "generations"
    EDITS = "edits"
    VARIATIONS = "variations"


@dataclass(frozen=True)
class Upload:
    """An uploaded file as received: bytes are sniffed later, the filename is not trusted."""

    param: str
    data: bytes


@dataclass(frozen=True)
class ImageRequest:
    """One API call after parsing, before any checking: what the client asked for.

    Values the client did not send are ``None``, so the service can tell a default from a
    choice (an extra the model cannot use is refused only when actually sent).
    """

    endpoint: Endpoint
    prompt: str | None = None
    model: str | None = None
    n: int = 1
    size: str | None = None
    quality: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    input_fidelity: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    strength: float | None = None
    loras: tuple[LoraChoice, ...] | None = None  # None: not sent (a preset's apply)
    step_cache: str | None = None
    images: tuple[Upload, ...] = ()
    mask: Upload | None = None
