"""Qwen-Image: text-to-image, image-to-image and inpainting via from_pipe.

Guidance is true CFG: ``true_cfg_scale`` (default 4) contrasts the prompt with a negative
prompt (default " ", as the model card does); above 1 without one diffusers silently skips
it. The pipelines take ``guidance_scale`` only for guidance-distilled checkpoints, which no
released one is. Latents are packed 2x2 after a VAE with scale 8: multiples of 16.
"""

from diffuser_api.models.family import BLOCK_CACHES, Family
from diffuser_api.models.previews import QWEN_IMAGE_LATENT_RGB, qwen_grid, qwen_vae_preview

TRUE_CFG = dict(
    default_guidance_scale=None,
    default_true_cfg_scale=4.0,
    default_negative_prompt=" ",
    negative_prompt_scale="true_cfg_scale",
    ignored_extras=frozenset({"guidance_scale"}),
)

# Previews of the one-frame video VAE every Qwen-Image family shares.
PREVIEWS = dict(latent_grid=qwen_grid, latent_rgb=QWEN_IMAGE_LATENT_RGB, vae_preview=qwen_vae_preview)

FAMILY = Family(
    **PREVIEWS,
    name="qwen-image",
    pipeline_classes=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
    size_multiple=16,
    default_steps=50,
    default_strength=0.6,
    examples=("Qwen/Qwen-Image",),
    **TRUE_CFG,
    step_caches=BLOCK_CACHES,
)
