"""Qwen-Image-Edit-Plus (2509, 2511): edits of one or several images guided by one prompt.

The same components and call as :mod:`.qwen_image_edit`, but diffusers has no inpainting
pipeline for it (masked edits are 501) and it honours ``height``/``width`` (multiples of 16).
Several ``image[]`` files are passed as one list; the model cards call 1-3 images optimal.
"""

from diffuser_api.models.family import BLOCK_CACHES, Family
from diffuser_api.models.qwen_image import PREVIEWS, TRUE_CFG
from diffuser_api.models.qwen_image_edit import EDIT_CALL

FAMILY = Family(
    **PREVIEWS,
    name="qwen-image-edit-plus",
    pipeline_classes=("QwenImageEditPlusPipeline",),
    size_multiple=16,
    default_steps=40,
    max_input_images=3,
    examples=("Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511"),
    **TRUE_CFG,
    **EDIT_CALL,
    step_caches=BLOCK_CACHES,
)
