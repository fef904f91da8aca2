"""``tiny-qwen-image``: a Qwen-Image pipeline with random weights (under 1 MB).

Qwen2.5-VL text encoder (width 16, byte-level tokenizer), a 4-channel Qwen-Image VAE with
scale factor 8, and a 2x2-patch MMDiT. Sizes must be multiples of 16.

Random weights at their default scale give a flat grey picture that ignores the prompt and
the input image (max pixel difference at most 1/255). :func:`make_responsive` fixes that:
a 12x louder VAE output layer, transformer matrices re-drawn with std 0.3 and q/k norms x2.
:func:`components` is shared with the edit models in :mod:`.qwen_image_edit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diffuser_api.models.tiny._rescale import amplify_output, sharpen_attention
from diffuser_api.models.tiny.tokenizers import (
    QWEN_ENDOFTEXT_TOKEN_ID,
    QWEN_IM_END_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_TOKEN_ID,
    QWEN_VISION_START_TOKEN_ID,
    QWEN_VOCAB_SIZE,
    build_qwen2_tokenizer,
)

HIDDEN_SIZE = 16
Z_DIM = 4
TEXT_ENCODER_CONFIG = dict(
    text_config=dict(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
        bos_token_id=QWEN_ENDOFTEXT_TOKEN_ID, eos_token_id=QWEN_IM_END_TOKEN_ID,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    ),
    vision_config=dict(
        depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=HIDDEN_SIZE,
        fullatt_block_indexes=[1],
    ),
    vocab_size=QWEN_VOCAB_SIZE,
    hidden_size=HIDDEN_SIZE,
    bos_token_id=QWEN_ENDOFTEXT_TOKEN_ID,
    eos_token_id=QWEN_IM_END_TOKEN_ID,
    image_token_id=QWEN_IMAGE_TOKEN_ID,
    video_token_id=QWEN_VIDEO_TOKEN_ID,
    vision_start_token_id=QWEN_VISION_START_TOKEN_ID,
    vision_end_token_id=QWEN_VISION_END_TOKEN_ID,
)
VAE_CONFIG = dict(
    base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
)
TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=4 * Z_DIM,  # latents are packed 2x2
    out_channels=Z_DIM,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=HIDDEN_SIZE,
    guidance_embeds=False,
    axes_dims_rope=(8, 4, 4),  # sums to the head dim
)
VAE_OUTPUT_GAIN = 12.0
TRANSFORMER_WEIGHT_STD = 0.3
QK_NORM_GAIN = 2.0


def make_responsive(vae: AutoencoderKLQwenImage, transformer: QwenImageTransformer2DModel) -> None:
    """Rescale random weights so the output shows the prompt, input image and CFG."""
    amplify_output(vae.decoder.conv_out, VAE_OUTPUT_GAIN)
    with torch.no_grad():
        for param in transformer.parameters():
            if param.dim() == 2:
                param.normal_(0.0, TRANSFORMER_WEIGHT_STD)
    sharpen_attention(transformer, QK_NORM_GAIN)


def components() -> dict[str, Any]:
    """Seeded components shared by the tiny Qwen-Image pipelines (no processor)."""
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**VAE_CONFIG)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TEXT_ENCODER_CONFIG))
    make_responsive(vae, transformer)
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_qwen2_tokenizer(),
        transformer=transformer,
    )


def build(folder: Path) -> None:
    QwenImagePipeline(**components()).save_pretrained(folder)
