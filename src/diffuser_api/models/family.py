"""What a model family module declares: data first, and the few functions that differ.

The generic loader and runner read a ``Family``; adding a family means writing one module
with one of these and listing it in ``families.py``. Nothing in the API changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL.Image import Image, Resampling

from diffuser_api.domain import ImageJob, Task

# Extras every family honours, because the generic runner applies them itself.
UNIVERSAL_EXTRAS = frozenset({"num_inference_steps", "seed"})
# Extras a family honours when its pipeline's __call__ takes a parameter of that name.
SIGNATURE_EXTRAS = ("guidance_scale", "true_cfg_scale", "negative_prompt", "strength")

CallKwargs = Callable[[Task, Sequence[ImageJob]], dict[str, Any]]
# (pipeline, latents at this step, height, width, scale) -> one preview image per batch row.
# ``scale`` < 1 decodes smaller latents (the VAE's cost falls with their area, or faster)
# and the preview is resized back up to the output size.
PreviewDecoder = Callable[[Any, Any, int, int, float], list[Image]]
LoadKwargs = Callable[[str], dict[str, Any]]


def no_load_kwargs(source: str) -> dict[str, Any]:
    return {}


def vae_preview(pipeline: Any, latents: Any, height: int, width: int, scale: float) -> list[Image]:
    """Unpacked (SD-style) latents: undo the VAE scaling and decode with the pipeline's VAE."""
    vae = pipeline.vae
    if scale < 1:
        latents = torch.nn.functional.interpolate(latents, scale_factor=scale, mode="bilinear")
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = pipeline.image_processor.postprocess(decoded, output_type="pil")
    return [image.resize((width, height), Resampling.BILINEAR) for image in images]


def generators(jobs: Sequence[ImageJob]) -> list[torch.Generator]:
    """One CPU generator per output image, so a seed gives the same pixels alone or batched,
    on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for job in jobs for seed in job.seeds]


def per_image(jobs: Sequence[ImageJob], value: Callable[[ImageJob], Any]) -> list[Any]:
    return [value(job) for job in jobs for _ in job.seeds]


def prompt_list_kwargs(task: Task, jobs: Sequence[ImageJob]) -> dict[str, Any]:
    """Pipelines that take one prompt (and image) per output: SD, SDXL, SD3, Flux.

    Every output image is its own batch row, with its own prompt, image and generator.
    """
    first = jobs[0]
    kwargs: dict[str, Any] = {
        "prompt": per_image(jobs, lambda job: job.prompt),
        "num_inference_steps": first.steps,
        "generator": generators(jobs),
        "num_images_per_prompt": 1,
    }
    if first.guidance_scale is not None:
        kwargs["guidance_scale"] = first.guidance_scale
    if any(job.negative_prompt for job in jobs):
        kwargs["negative_prompt"] = per_image(jobs, lambda job: job.negative_prompt or "")
    if task is Task.GENERATION or task is Task.MASKED_EDIT:
        kwargs["height"], kwargs["width"] = first.height, first.width
    if task is not Task.GENERATION:
        kwargs["image"] = per_image(jobs, lambda job: job.images[0])
        if first.strength is not None:
            kwargs["strength"] = first.strength
    if task is Task.MASKED_EDIT:
        kwargs["mask_image"] = per_image(jobs, lambda job: job.mask)
    return kwargs


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: frozenset[str]
    size_multiple: int
    default_steps: int
    default_guidance_scale: float | None
    default_strength: float | None = None
    # Extras the pipeline signature takes but the family ignores (e.g. guidance without embeds).
    ignored_extras: frozenset[str] = frozenset()
    # Whether prompts and images may differ between the rows of one call.
    batches_across_requests: bool = True
    max_input_images: int = 1
    call_kwargs: CallKwargs = prompt_list_kwargs
    # Extra ``from_pretrained`` arguments (e.g. a processor that avoids torchvision).
    load_kwargs: LoadKwargs = no_load_kwargs
    # How to turn mid-denoising latents into images for streamed previews.
    preview: PreviewDecoder = vae_preview
    notes: tuple[str, ...] = field(default=())
