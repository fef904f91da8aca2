"""Wires settings -> registry (with the diffusers loader) -> app. The only place that does."""

from __future__ import annotations

from fastapi import FastAPI

from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.engine import EngineLimits
from diffuser_api.models.in_memory import registry_of_one
from diffuser_api.models.registry import LoadedRunners, ModelRegistry, warm_up
from diffuser_api.models.spec import ModelSpec


def engine_limits(settings: Settings) -> EngineLimits:
    return EngineLimits(
        max_queue_size=settings.max_queue_size,
        max_batch_size=settings.max_batch_size,
        max_batch_pixels=settings.max_batch_pixels,
        batch_wait_s=settings.batch_wait_ms / 1000,
        request_timeout_s=settings.request_timeout_s,
    )


def build_registry(settings: Settings) -> ModelRegistry:
    """One model from ``DIFFUSER_MODEL_ID``, pinned. Interim: its probe loads the weights (see
    ``registry_of_one``) until a probe that reads only the checkpoint's configs exists."""
    # Imported here so that building an app with another registry (tests) never loads torch.
    from diffuser_api.models.loading import LoadOptions, load_model

    options = LoadOptions(
        model_id=settings.model_id,
        cache_dir=settings.cache_dir,
        devices=tuple(settings.device),
        torch_dtype=settings.torch_dtype,
        min_image_size=settings.min_image_size,
        max_image_size=settings.max_image_size,
        variation_strength=settings.variation_strength,
        preview_scale=settings.preview_scale,
        family=settings.family,
    )
    spec = ModelSpec(
        id=settings.model_id, source=settings.model_id, pinned=True, devices=tuple(settings.device),
        torch_dtype=settings.torch_dtype, family=settings.family,
        disabled_tasks=frozenset(settings.disabled_tasks), variation_prompt=settings.variation_prompt,
        variation_strength=settings.variation_strength, engine=engine_limits(settings), warmup=settings.warmup,
    )

    def load() -> LoadedRunners:
        loaded = load_model(options)
        if settings.warmup:
            warm_up(loaded)
        return loaded

    return registry_of_one(spec, load, strict_names=settings.strict_model_names)


def build_app(settings: Settings) -> FastAPI:
    from diffuser_api.models.device_memory import cuda_memory

    return create_app(settings, build_registry(settings), device_memory=cuda_memory)
