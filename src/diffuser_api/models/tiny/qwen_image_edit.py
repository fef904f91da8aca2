"""``tiny-qwen-image-edit`` and ``tiny-qwen-image-edit-plus``: Qwen-Image-Edit pipelines with
the ``tiny-qwen-image`` components plus an image-only Qwen2-VL processor.

The processor is :class:`diffuser_api.models.qwen_processor.Qwen2VLImageOnlyProcessor`, so
``diffuser_api.models.qwen_processor`` must be imported before
``DiffusionPipeline.from_pretrained(folder)`` (see that module). Its image processor keeps
every image at 56x56 px: 4 vision tokens whatever the input size.

Both pipelines resize the input image to about 1 MPix inside ``__call__`` (Plus also to
384x384 for the vision encoder), whatever the output size; sizes snap to 32 px.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from transformers import Qwen2VLImageProcessorPil

from diffuser_api.models.qwen_processor import Qwen2VLImageOnlyProcessor
from diffuser_api.models.tiny import qwen_image

VISION_PIXELS = 56 * 56


def _build(pipeline_class: type, folder: Path) -> None:
    parts = qwen_image.components()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=VISION_PIXELS, max_pixels=VISION_PIXELS)
    parts["processor"] = Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=parts["tokenizer"])
    pipeline_class(**parts).save_pretrained(folder)


def build(folder: Path) -> None:
    _build(QwenImageEditPipeline, folder)


def build_plus(folder: Path) -> None:
    _build(QwenImageEditPlusPipeline, folder)
