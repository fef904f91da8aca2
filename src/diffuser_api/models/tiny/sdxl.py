"""``tiny-sdxl``: a Stable Diffusion XL pipeline with random weights (under 1 MB).

Two CLIP text encoders (the second with a projection, as in real SDXL) feed a UNet whose
cross-attention width is their concatenated hidden size and whose ``text_time`` embedding
takes the six size/crop numbers plus the pooled projection. Sizes must be multiples of 8.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffuser_api.models.tiny.stable_diffusion import CLIP_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG
from diffuser_api.models.tiny.tokenizers import build_clip_tokenizer

ADDITION_TIME_EMBED_DIM = 8
UNET_XL_CONFIG = dict(
    UNET_CONFIG,
    cross_attention_dim=2 * CLIP_CONFIG["hidden_size"],  # TE1 and TE2 hidden states side by side
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    transformer_layers_per_block=(1, 1),
    addition_embed_type="text_time",
    addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
    # original size, crop corner, target size (6 numbers) + TE2's pooled projection
    projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + CLIP_CONFIG["projection_dim"],
)


def build(folder: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**UNET_XL_CONFIG),
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,  # as in stabilityai/stable-diffusion-xl-base-1.0
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
