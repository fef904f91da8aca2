"""``tiny-sd3``: a Stable Diffusion 3 pipeline with random weights (about 1.5 MB).

Layout of SD3-medium, shrunk: two CLIP encoders with projections (pooled 32+32 = 64) and a
T5 encoder whose width (64) equals the two CLIP hidden states side by side, as 4096 does in
the real model; a 16-channel VAE with scale factor 8; an MMDiT with 2x2 patches. Sizes must
be multiples of 16 and at most ``POS_EMBED_MAX_SIZE * 16`` = 1024 px a side (the real model
allows 96 * 16 = 1536; the position table is what would make this one large).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffuser_api.models.tiny.stable_diffusion import CLIP_CONFIG, VAE_CONFIG
from diffuser_api.models.tiny.tokenizers import T5_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer

LATENT_CHANNELS = 16
POS_EMBED_MAX_SIZE = 64
T5_CONFIG = dict(
    vocab_size=T5_VOCAB_SIZE, d_model=2 * CLIP_CONFIG["hidden_size"], d_kv=8, d_ff=37, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
)
VAE_SD3_CONFIG = dict(
    VAE_CONFIG, latent_channels=LATENT_CHANNELS, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0609, scaling_factor=1.5305,
)
TRANSFORMER_CONFIG = dict(
    sample_size=8,  # default size 8 * 8 = 64 px, like tiny-sd
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,  # = heads * head dim
    joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=2 * CLIP_CONFIG["projection_dim"],
    pos_embed_max_size=POS_EMBED_MAX_SIZE,
)


def build(folder: Path) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TRANSFORMER_CONFIG),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3-medium's scheduler
        vae=AutoencoderKL(**VAE_SD3_CONFIG),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG)),
        tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(T5Config(**T5_CONFIG)),
        tokenizer_3=build_t5_tokenizer(),
    )
    pipe.save_pretrained(folder)
