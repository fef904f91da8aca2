"""Stable Diffusion XL: text-to-image, image-to-image and inpainting via from_pipe."""

from diffuser_api.models.family import Family
from diffuser_api.models.previews import SDXL_LATENT_RGB

FAMILY = Family(
    name="sdxl",
    pipeline_classes=(
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    ),
    size_multiple=8,
    default_steps=30,
    default_guidance_scale=5.0,
    # diffusers' img2img default (0.3) is tuned for the refiner; an edit wants a visible change.
    default_strength=0.8,
    latent_rgb=SDXL_LATENT_RGB,
    examples=("stabilityai/stable-diffusion-xl-base-1.0",),
)
