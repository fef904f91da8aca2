"""The engine's contract with a model: how to group jobs and how to run a group."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from PIL.Image import Image

from diffuser_api.domain import GeneratedImage, ImageJob

# Decodes the current latents into preview images: one list per job, one image per output.
# Only called when a job asked for partial images at this step, because it costs a VAE pass.
PreviewSource = Callable[[], list[list[Image]]]

# Called by the runner after every denoising step with (step, total_steps, previews); it may
# raise to abort the pipeline call (every client of the batch has gone).
StepCallback = Callable[[int, int, PreviewSource], None]


class ModelRunner(Protocol):
    """One copy of a model on one device, driven by exactly one worker thread."""

    name: str

    def batch_key(self, job: ImageJob) -> Hashable:
        """Jobs with equal keys can share one pipeline call."""
        ...

    def run(self, jobs: Sequence[ImageJob], on_step: StepCallback) -> list[list[GeneratedImage]]:
        """Run the jobs in one call; return each job's images in order."""
        ...
