"""Mid-denoising latents to preview images, the way each family's pipeline decodes its output.

``scale`` < 1 decodes downscaled latents (the VAE's cost falls at least with their area) and
resizes the preview back up to the output size: a preview is seen once, so it may be soft.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL.Image import Image, Resampling


def _downscale(latents: torch.Tensor, scale: float) -> torch.Tensor:
    if scale >= 1:
        return latents
    return torch.nn.functional.interpolate(latents, scale_factor=scale, mode="bilinear")


def _to_images(pipeline: Any, decoded: torch.Tensor, height: int, width: int) -> list[Image]:
    images = pipeline.image_processor.postprocess(decoded, output_type="pil")
    return [image.resize((width, height), Resampling.BILINEAR) for image in images]


def vae_preview(pipeline: Any, latents: torch.Tensor, height: int, width: int, scale: float) -> list[Image]:
    """Unpacked latents (SD, SDXL, SD3): undo the VAE's scaling and shift, then decode."""
    vae = pipeline.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = _downscale(latents, scale).to(vae.dtype) / vae.config.scaling_factor + shift
    return _to_images(pipeline, vae.decode(latents, return_dict=False)[0], height, width)


def packed_preview(pipeline: Any, latents: torch.Tensor, height: int, width: int, scale: float) -> list[Image]:
    """Flux packs 2x2 latent patches into tokens; unpack them first."""
    unpacked = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    return vae_preview(pipeline, unpacked, height, width, scale)


def qwen_preview(pipeline: Any, latents: torch.Tensor, height: int, width: int, scale: float) -> list[Image]:
    """Qwen-Image: packed tokens of a video VAE (one frame), normalised per channel."""
    vae = pipeline.vae
    frames = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)  # (B, C, 1, h, w)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(frames)
    std = torch.tensor(vae.config.latents_std).view(shape).to(frames)
    frame = _downscale((frames * std + mean)[:, :, 0], scale).unsqueeze(2)
    return _to_images(pipeline, vae.decode(frame.to(vae.dtype), return_dict=False)[0][:, :, 0], height, width)
