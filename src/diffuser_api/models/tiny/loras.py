"""Tiny random LoRA adapters for the tiny pipelines, built offline with ``peft``.

They are saved in diffusers' LoRA format (the pipeline class's ``save_lora_weights``), so a
server loads them through diffusers' real ``load_lora_weights``, as it would a downloaded one.
peft starts ``lora_B`` at zero (an adapter that changes nothing); these start it random
(``init_lora_weights=False``), so an adapter visibly changes the pixels. Cached like the tiny
pipelines: written to a temporary name, then renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffuser_api.models.tiny import ensure_tiny_model

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Attention projections: every family's denoiser names them so (UNet, Flux, Qwen-Image).
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4


def ensure_tiny_lora(
    model_id: str, seed: int, cache_dir: Path, rank: int = RANK, target_modules: Sequence[str] = TARGET_MODULES
) -> Path:
    """The ``.safetensors`` file of a random LoRA for a tiny model, built the first time.

    ``seed`` tells adapters apart: two seeds give two different adapters of the same shape;
    ``rank`` and ``target_modules`` give other shapes (hot-swap accepts some and refuses others).
    """
    shape = "" if (rank, list(target_modules)) == (RANK, TARGET_MODULES) else f"-r{rank}-{'+'.join(target_modules)}"
    target = cache_dir / "loras" / f"{model_id}-{seed}{shape}.safetensors"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model_id}-{seed}-") as scratch:
        _build(ensure_tiny_model(model_id, cache_dir), seed, Path(scratch), rank, target_modules)
        os.replace(Path(scratch) / WEIGHT_NAME, target)
    return target


def _build(model_folder: Path, seed: int, folder: Path, rank: int, target_modules: Sequence[str]) -> None:
    pipe = DiffusionPipeline.from_pretrained(model_folder)
    denoiser_name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    torch.manual_seed(seed)
    denoiser.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=False)
    )
    layers = get_peft_model_state_dict(denoiser)
    type(pipe).save_lora_weights(folder, **{f"{denoiser_name}_lora_layers": layers}, safe_serialization=True)
