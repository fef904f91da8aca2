"""What a model family module declares: data first, and the few functions that differ.

The generic loader and runner read a ``Family``; adding a family means writing one module
with one of these and listing it in ``families.py``. Nothing in the API changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL.Image import Image

from diffuser_api.domain import ImageJob, StepCacheMethod, Task
from diffuser_api.models.previews import LatentRgbMap, unpacked_grid, vae_preview

# Extras every family honours, because the generic runner applies them itself.
UNIVERSAL_EXTRAS = frozenset({"num_inference_steps", "seed"})
# Extras a family honours when its pipeline's __call__ takes a parameter of that name.
SIGNATURE_EXTRAS = ("guidance_scale", "true_cfg_scale", "negative_prompt", "strength")

# The cache hooks that work on any transformer whose blocks diffusers registers; MagCache
# needs calibration ratios, which diffusers publishes for FLUX.1 only (``FLUX_MAG_RATIOS``).
BLOCK_CACHES = frozenset({StepCacheMethod.FIRST_BLOCK_CACHE, StepCacheMethod.TAYLORSEER})

CallKwargs = Callable[[Task, Sequence[ImageJob]], dict[str, Any]]
# (pipeline, latents as the pipeline passes them to its step callback, height, width) ->
# the (B, C, h, w) latent grid in the denoiser's space (see ``previews.py``).
LatentGrid = Callable[[Any, Any, int, int], Any]
# (pipeline, latent grid, height, width, scale) -> one preview image per batch row.
# ``scale`` < 1 decodes smaller latents (the VAE's cost falls with their area, or faster)
# and the preview is resized back up to the output size.
VaePreview = Callable[[Any, Any, int, int, float], list[Image]]
CallScope = Callable[[Sequence[ImageJob]], AbstractContextManager[Any]]
LoadKwargs = Callable[[str], dict[str, Any]]


def no_load_kwargs(source: str) -> dict[str, Any]:
    return {}


def no_scope(jobs: Sequence[ImageJob]) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def generators(jobs: Sequence[ImageJob]) -> list[torch.Generator]:
    """One CPU generator per output image, so a seed gives the same pixels alone or batched,
    on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for job in jobs for seed in job.seeds]


def per_image(jobs: Sequence[ImageJob], value: Callable[[ImageJob], Any]) -> list[Any]:
    return [value(job) for job in jobs for _ in job.seeds]


def sampling_kwargs(jobs: Sequence[ImageJob]) -> dict[str, Any]:
    """Steps, generators and guidance: equal for every job of a call (the runner's batch key)."""
    first = jobs[0]
    kwargs: dict[str, Any] = {"num_inference_steps": first.steps, "generator": generators(jobs)}
    if first.guidance_scale is not None:
        kwargs["guidance_scale"] = first.guidance_scale
    if first.true_cfg_scale is not None:
        kwargs["true_cfg_scale"] = first.true_cfg_scale
    if first.strength is not None:
        kwargs["strength"] = first.strength
    return kwargs


def prompt_list_kwargs(task: Task, jobs: Sequence[ImageJob]) -> dict[str, Any]:
    """Pipelines that take one prompt (and image) per output: SD, SDXL, SD3, Flux, Qwen-Image.

    Every output image is its own batch row, with its own prompt, image and generator.
    """
    kwargs: dict[str, Any] = {
        "prompt": per_image(jobs, lambda job: job.prompt),
        "num_images_per_prompt": 1,
        **sampling_kwargs(jobs),
    }
    if any(job.negative_prompt for job in jobs):
        kwargs["negative_prompt"] = per_image(jobs, lambda job: job.negative_prompt or "")
    if task is not Task.GENERATION:
        kwargs["image"] = per_image(jobs, lambda job: job.images[0])
    if task is Task.MASKED_EDIT:
        kwargs["mask_image"] = per_image(jobs, lambda job: job.mask)
    return kwargs


def prompt_per_call_kwargs(task: Task, jobs: Sequence[ImageJob]) -> dict[str, Any]:
    """Pipelines that take one prompt and its input image(s) per call and make ``n`` images of
    it: Kontext and Qwen-Image-Edit (Plus raises on a list of prompts, and a list of images
    means several inputs for one edit). Their family sets ``batches_across_requests=False``.
    """
    (job,) = jobs
    kwargs: dict[str, Any] = {"prompt": job.prompt, "num_images_per_prompt": job.n, **sampling_kwargs(jobs)}
    if job.negative_prompt:
        kwargs["negative_prompt"] = job.negative_prompt
    if job.images:
        kwargs["image"] = list(job.images) if len(job.images) > 1 else job.images[0]
    if job.mask is not None:
        kwargs["mask_image"] = job.mask
    return kwargs


@dataclass(frozen=True)
class Family:
    name: str
    # model_index.json class names that pick this family; the first is the family's main
    # pipeline, from which the README table derives its endpoints and extras.
    pipeline_classes: tuple[str, ...]
    size_multiple: int
    default_steps: int
    default_guidance_scale: float | None
    default_strength: float | None = None
    default_true_cfg_scale: float | None = None
    # Sent when the client sends neither negative_prompt nor true_cfg_scale, so the default
    # true CFG runs (Qwen-Image's model cards use " ").
    default_negative_prompt: str | None = None
    # The scale a negative prompt needs above 1 (see Capabilities.negative_prompt_scale).
    negative_prompt_scale: str = "guidance_scale"
    # Extras the pipeline signature takes but every checkpoint of the family ignores
    # (Qwen-Image pipelines take guidance_scale for future guidance-distilled models).
    ignored_extras: frozenset[str] = frozenset()
    # Whether prompts and images may differ between the rows of one call.
    batches_across_requests: bool = True
    max_input_images: int = 1
    # Task pipelines diffusers has for this family but its AutoPipeline mappings do not name
    # (task -> diffusers class name); made with ``from_pipe`` like the mapped ones.
    unmapped_task_pipelines: tuple[tuple[Task, str], ...] = ()
    call_kwargs: CallKwargs = prompt_list_kwargs
    # Wraps every pipeline call (e.g. a per-call override of a diffusers module constant).
    call_scope: CallScope = no_scope
    # Extra ``from_pretrained`` arguments (e.g. a processor that avoids torchvision).
    load_kwargs: LoadKwargs = no_load_kwargs
    # Streamed previews: how to unpack the step's latents into a grid, the fixed latent-to-RGB
    # map of the family's VAE (None: none known), and the VAE decode used where the map cannot be.
    latent_grid: LatentGrid = unpacked_grid
    latent_rgb: LatentRgbMap | None = None
    vae_preview: VaePreview = vae_preview
    # diffusers cache hooks the family's denoiser supports (its blocks are in diffusers'
    # TransformerBlockRegistry; MagCache also needs published calibration ratios).
    step_caches: frozenset[StepCacheMethod] = frozenset()
    # Hub ids of checkpoints of this family, for people reading the family table.
    examples: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
