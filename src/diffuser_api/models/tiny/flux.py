"""``tiny-flux``: a FLUX.1 pipeline with random weights (under 1 MB).

CLIP gives the pooled vector (32), T5 the sequence (width 32); the VAE has 4 latent channels
and scale factor 8, packed 2x2 into the transformer's 16 input channels. The transformer has
a guidance embedding like FLUX.1-dev and Kontext-dev, so ``guidance_scale`` matters. Sizes
must be multiples of 16. :func:`components` is shared with ``tiny-flux-kontext``.

At their default scale the random weights let the 512 padded T5 tokens swamp the attention,
so a Kontext input image barely shows (max pixel difference 1-2/255).
:func:`make_responsive` sharpens the attention (q/k RMSNorm weights x3) and makes the VAE
output 4x louder: the input image then moves pixels by about 60/255, the prompt by 80.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffuser_api.models.tiny._rescale import amplify_output, sharpen_attention
from diffuser_api.models.tiny.stable_diffusion import CLIP_CONFIG, VAE_CONFIG
from diffuser_api.models.tiny.tokenizers import T5_VOCAB_SIZE, build_clip_tokenizer, build_t5_tokenizer

T5_CONFIG = dict(
    vocab_size=T5_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
)
VAE_FLUX_CONFIG = dict(
    VAE_CONFIG, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4 * VAE_CONFIG["latent_channels"],  # latents are packed 2x2
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=CLIP_CONFIG["hidden_size"],
    guidance_embeds=True,
    axes_dims_rope=(4, 4, 8),  # sums to the head dim
)

VAE_OUTPUT_GAIN = 4.0
QK_NORM_GAIN = 3.0


def make_responsive(vae: AutoencoderKL, transformer: FluxTransformer2DModel) -> None:
    """Rescale random weights so the output shows the prompt, guidance and input image."""
    amplify_output(vae.decoder.conv_out, VAE_OUTPUT_GAIN)
    sharpen_attention(transformer, QK_NORM_GAIN)


def components() -> dict[str, Any]:
    """Seeded components of a tiny Flux pipeline (the same for every Flux variant)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    vae = AutoencoderKL(**VAE_FLUX_CONFIG)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    make_responsive(vae, transformer)
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**T5_CONFIG)),
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def build(folder: Path) -> None:
    FluxPipeline(**components()).save_pretrained(folder)
