"""Qwen-Image-Edit: edits guided by a prompt, and masked edits (``QwenImageEditInpaintPipeline``).

No text-to-image pipeline exists for it, and its edit pipeline takes no ``strength``, so
generations and variations are 501 and ``strength`` applies to masked edits only. Guidance
is true CFG, as in :mod:`.qwen_image`.

Sizes: the edit pipeline honours ``height``/``width`` (multiples of 16), but the inpaint
pipeline ignores them and sizes its output with ``calculate_dimensions``, which snaps to 32;
at the requested area (see :mod:`.qwen_working_area`) that gives the requested size exactly
when both sides are multiples of 32, hence the family's multiple.

Checkpoints name ``transformers.Qwen2VLProcessor``, which needs torchvision for its unused
video part; the loader passes the image-only processor instead (:mod:`.qwen_processor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from diffuser_api.domain import ImageJob
from diffuser_api.models.family import BLOCK_CACHES, Family, prompt_per_call_kwargs
from diffuser_api.models.qwen_image import PREVIEWS, TRUE_CFG
from diffuser_api.models.qwen_processor import load_qwen_processor
from diffuser_api.models.qwen_working_area import working_area


def processor_kwargs(source: str) -> dict[str, Any]:
    return {"processor": load_qwen_processor(source)}


def at_output_area(jobs: Sequence[ImageJob]) -> AbstractContextManager[None]:
    """Size the input for the VAE at the output's area instead of a fixed 1 MPix."""
    return working_area(jobs[0].width * jobs[0].height)


EDIT_CALL = dict(
    batches_across_requests=False,
    call_kwargs=prompt_per_call_kwargs,
    call_scope=at_output_area,
    load_kwargs=processor_kwargs,
)

FAMILY = Family(
    **PREVIEWS,
    name="qwen-image-edit",
    pipeline_classes=("QwenImageEditPipeline", "QwenImageEditInpaintPipeline"),
    size_multiple=32,
    default_steps=50,
    default_strength=1.0,  # masked edits repaint the masked area fully, as the model card does
    examples=("Qwen/Qwen-Image-Edit",),
    **TRUE_CFG,
    **EDIT_CALL,
    step_caches=BLOCK_CACHES,
)
