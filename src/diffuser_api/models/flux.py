"""FLUX.1 (dev, schnell): text-to-image, image-to-image and inpainting via from_pipe.

``guidance_scale`` feeds the guidance embedding of guidance-distilled checkpoints (dev); the
loader refuses it for checkpoints without one (schnell). True CFG (``true_cfg_scale`` above 1
with a ``negative_prompt``) doubles the cost; off by default. Latents are packed 2x2 after a
VAE with scale 8, so sides are multiples of 16 (diffusers silently rounds others down).
"""

from diffuser_api.domain import StepCacheMethod
from diffuser_api.models.family import BLOCK_CACHES, Family
from diffuser_api.models.previews import FLUX_LATENT_RGB, flux_grid

# Previews read the 2x2-packed tokens unpacked; shared with Kontext (same VAE).
PREVIEWS = dict(latent_grid=flux_grid, latent_rgb=FLUX_LATENT_RGB)

FAMILY = Family(
    **PREVIEWS,
    name="flux",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    size_multiple=16,
    default_steps=28,
    default_guidance_scale=3.5,
    default_strength=0.6,
    default_true_cfg_scale=1.0,
    negative_prompt_scale="true_cfg_scale",
    examples=("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"),
    step_caches=BLOCK_CACHES | {StepCacheMethod.MAGCACHE},
)
