"""Which preview a model gets (``DIFFUSER_PREVIEW_MODE`` against what its checkpoint allows), and
the decoder that makes it.

The probe (for ``GET /v1/models/{id}``, before any load) and the loader (for the runners) both
decide from the VAE's config through ``plan_previews``, so what a model reports is what it does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from PIL.Image import Image

from diffuser_api.domain.capabilities import PreviewPlan
from diffuser_api.models.family import Family
from diffuser_api.models.previews import latent_to_rgb

PreviewMode = Literal["latent", "vae"]
# (pipeline, latents as the step callback gets them, height, width) -> one image per batch row.
PreviewDecoder = Callable[[Any, Any, int, int], list[Image]]


def latent_channels(vae_config: Mapping[str, Any]) -> int | None:
    """AutoencoderKL calls them ``latent_channels``; Qwen-Image's video VAE ``z_dim``."""
    channels = vae_config.get("latent_channels") or vae_config.get("z_dim")
    return int(channels) if channels else None


def plan_previews(family: Family, channels: int | None, wanted: PreviewMode, scale: float) -> PreviewPlan:
    """The latent map where asked for and the checkpoint's latent space is the one it was fitted
    on (same channel count as the family's real VAE); a VAE decode otherwise, saying why."""
    vae_decode = f"a VAE decode of the latents at {scale:g} scale"
    if wanted == "vae":
        return PreviewPlan("vae", f"{vae_decode}, as DIFFUSER_PREVIEW_MODE=vae asks")
    latent_map = family.latent_rgb
    if latent_map is None:
        return PreviewPlan("vae", f"{vae_decode}: family {family.name} has no latent-to-RGB map")
    if channels != latent_map.channels:
        return PreviewPlan(
            "vae",
            f"{vae_decode}: this checkpoint's VAE has {channels} latent channels and the {family.name} "
            f"latent-to-RGB map needs {latent_map.channels}",
        )
    return PreviewPlan("latent", f"a fixed linear map of the {channels} latent channels to RGB, resized up")


def preview_decoder(family: Family, plan: PreviewPlan, scale: float) -> PreviewDecoder:
    latent_map = family.latent_rgb
    if plan.mode == "latent" and latent_map is not None:
        def by_latent_map(pipeline: Any, latents: Any, height: int, width: int) -> list[Image]:
            return latent_to_rgb(latent_map, family.latent_grid(pipeline, latents, height, width), height, width)

        return by_latent_map

    def by_vae(pipeline: Any, latents: Any, height: int, width: int) -> list[Image]:
        grid = family.latent_grid(pipeline, latents, height, width)
        return family.vae_preview(pipeline, grid, height, width, scale)

    return by_vae
