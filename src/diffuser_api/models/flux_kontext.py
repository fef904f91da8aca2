"""FLUX.1 Kontext: edits guided by a prompt, and text-to-image when no image is given.

``FluxKontextPipeline`` is its own edit pipeline; masked edits use diffusers'
``FluxKontextInpaintPipeline``, which no AutoPipeline mapping names, so the family names it.
Variations are 501: the edit pipeline takes no strength. The pipelines ignore
``height``/``width`` and rescales its output to ``max_area`` at the input's aspect ratio, and
resizes the input to a preferred ~1 MPix size unless ``_auto_resize=False``: passing
``max_area=width*height`` and no auto-resize gives exactly the requested size (the service has
already resized the input to it). It takes one prompt per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffuser_api.domain import ImageJob, Task
from diffuser_api.models.family import BLOCK_CACHES, Family, prompt_per_call_kwargs
from diffuser_api.models.flux import PREVIEWS


def kontext_kwargs(task: Task, jobs: Sequence[ImageJob]) -> dict[str, Any]:
    job = jobs[0]
    return {**prompt_per_call_kwargs(task, jobs), "max_area": job.width * job.height, "_auto_resize": False}


FAMILY = Family(
    **PREVIEWS,
    name="flux-kontext",
    pipeline_classes=("FluxKontextPipeline",),
    size_multiple=16,
    default_steps=28,
    default_guidance_scale=2.5,
    default_true_cfg_scale=1.0,
    default_strength=1.0,
    negative_prompt_scale="true_cfg_scale",
    batches_across_requests=False,
    unmapped_task_pipelines=((Task.MASKED_EDIT, "FluxKontextInpaintPipeline"),),
    call_kwargs=kontext_kwargs,
    examples=("black-forest-labs/FLUX.1-Kontext-dev",),
    step_caches=BLOCK_CACHES,
)
