"""Latent-to-RGB previews: the map's arithmetic, each family's unpacking, and the choice of mode."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline

from diffuser_api.models.families import FAMILIES, family_for
from diffuser_api.models.preview_modes import latent_channels, plan_previews, preview_decoder
from diffuser_api.models.previews import SDXL_LATENT_RGB, latent_to_rgb

# The latent channels of each family's released VAE.
REAL_CHANNELS = {
    "stable-diffusion": 4, "sdxl": 4, "sd3": 16, "flux": 16, "flux-kontext": 16,
    "qwen-image": 16, "qwen-image-edit": 16, "qwen-image-edit-plus": 16,
}


def expected_rgb(factors, bias, grid: torch.Tensor) -> np.ndarray:
    """The map written out per pixel, independently of the einsum: (h, w, 3) in 0..255."""
    channels, height, width = grid.shape
    out = np.zeros((height, width, 3))
    for y in range(height):
        for x in range(width):
            for colour in range(3):
                value = bias[colour] + sum(float(grid[c, y, x]) * factors[c][colour] for c in range(channels))
                out[y, x, colour] = min(255.0, max(0.0, (value + 1) * 127.5))
    return out


def test_latent_map_is_the_published_linear_map_in_minus_one_to_one():
    grid = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    (image,) = latent_to_rgb(SDXL_LATENT_RGB, grid, height=3, width=5)
    assert image.size == (5, 3)
    want = expected_rgb(SDXL_LATENT_RGB.factors, SDXL_LATENT_RGB.bias, grid[0])
    assert np.abs(np.asarray(image, dtype=float) - want).max() <= 1


def test_latent_map_preview_is_resized_up_to_the_output_size():
    grid = torch.zeros(2, 4, 8, 16)
    images = latent_to_rgb(SDXL_LATENT_RGB, grid, height=64, width=128)
    assert [image.size for image in images] == [(128, 64), (128, 64)]
    # Zero latents give the bias alone: 0.1084 -> 141 in red.
    assert np.asarray(images[0])[0, 0].tolist() == [141, 125, 127]


def test_every_family_has_a_latent_map_for_its_released_vae():
    for family in FAMILIES:
        assert family.latent_rgb is not None, family.name
        assert family.latent_rgb.channels == REAL_CHANNELS[family.name], family.name
        plan = plan_previews(family, REAL_CHANNELS[family.name], "latent", 0.25)
        assert plan.mode == "latent", family.name


@pytest.mark.parametrize(("pipeline_class", "unpack"), [("FluxPipeline", FluxPipeline._unpack_latents),
                                                         ("QwenImagePipeline", QwenImagePipeline._unpack_latents)])
def test_packed_latents_are_unpacked_before_the_map(pipeline_class, unpack):
    """Flux and Qwen-Image give their step callback 2x2-packed tokens (B, h*w/4, 4C); the map
    must see each latent pixel's 16 channels, at its place in the image."""
    family = family_for(pipeline_class)
    height, width = 32, 64  # 4x8 latent pixels after the VAE's factor 8, packed into 2x4 tokens
    grid = torch.randn(1, 16, 4, 8, generator=torch.Generator().manual_seed(1))
    packed = grid.view(1, 16, 2, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 8, 64)
    pipeline = SimpleNamespace(_unpack_latents=unpack, vae_scale_factor=8)
    plan = plan_previews(family, 16, "latent", 0.25)
    (image,) = preview_decoder(family, plan, 0.25)(pipeline, packed, height, width)
    assert image.size == (width, height)
    want = expected_rgb(family.latent_rgb.factors, family.latent_rgb.bias, grid[0]).round().astype(np.uint8)
    # Each latent pixel is an 8x8 block of the preview: a wrong unpacking moves pixels by ~100.
    blocks = np.asarray(image, dtype=float).reshape(4, 8, 8, 8, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    assert np.abs(blocks[:, 0, :, 0] - want).max() <= 1


def test_a_checkpoint_with_other_latent_channels_falls_back_to_the_vae_and_says_why():
    plan = plan_previews(family_for("FluxPipeline"), 4, "latent", 0.25)
    assert plan.mode == "vae"
    assert plan.method == ("a VAE decode of the latents at 0.25 scale: this checkpoint's VAE has 4 latent "
                           "channels and the flux latent-to-RGB map needs 16")


def test_vae_mode_is_honoured_where_a_map_would_fit():
    plan = plan_previews(family_for("StableDiffusionPipeline"), 4, "vae", 0.5)
    assert plan.mode == "vae" and "0.5 scale" in plan.method and "DIFFUSER_PREVIEW_MODE=vae" in plan.method


def test_latent_channels_read_from_either_vae_config():
    assert latent_channels({"latent_channels": 16}) == 16
    assert latent_channels({"z_dim": 16, "base_dim": 96}) == 16
    assert latent_channels({}) is None
