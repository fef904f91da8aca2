"""Stable Diffusion 3 / 3.5: text-to-image, image-to-image and inpainting via from_pipe.

Its MMDiT patchifies 2x2 latents of a VAE with scale 8, so sides are multiples of 16; the
position table caps them (the loader reads ``pos_embed_max_size`` from the checkpoint).
"""

from diffuser_api.models.family import Family
from diffuser_api.models.previews import SD3_LATENT_RGB

FAMILY = Family(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    size_multiple=16,
    default_steps=28,
    default_guidance_scale=7.0,
    default_strength=0.6,
    latent_rgb=SD3_LATENT_RGB,
    examples=("stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3.5-large"),
)
