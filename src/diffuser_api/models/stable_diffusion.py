"""Stable Diffusion 1.x / 2.x: text-to-image, image-to-image and inpainting via from_pipe."""

from diffuser_api.models.family import Family
from diffuser_api.models.previews import SD_LATENT_RGB

FAMILY = Family(
    name="stable-diffusion",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    size_multiple=8,
    default_steps=30,
    default_guidance_scale=7.5,
    default_strength=0.8,
    latent_rgb=SD_LATENT_RGB,
    examples=("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1"),
)
