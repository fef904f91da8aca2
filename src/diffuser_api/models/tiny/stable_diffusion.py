"""``tiny-sd``: a Stable Diffusion 1.x pipeline with random weights (about 0.6 MB)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffuser_api.models.tiny.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer

CLIP_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32,
    intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    projection_dim=32, hidden_act="gelu",
)
# Four blocks give a VAE scale factor of 8, like the real model.
VAE_CONFIG = dict(
    latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
UNET_CONFIG = dict(
    sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
)


def build(folder: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET_CONFIG, attention_head_dim=2),
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
