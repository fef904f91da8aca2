"""What a checkpoint can do, read from its configs without loading a weight.

``model_index.json`` names the pipeline class (hence the family, and through diffusers'
``AutoPipelineFor*`` mappings the tasks and extras); the UNet / transformer / VAE
``config.json`` files give the native size, the position table's limit and whether guidance is
embedded. So ``GET /v1/models``, 501s and 400s are right for a model that is not loaded, and
cost no load. A loaded pipeline (a benchmark's in-memory one) goes through the same
``derive_capabilities`` with the configs of its components, so both roads give one answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
from diffusers import DiffusionPipeline

from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import Capabilities, SizeRules, StepCacheMethod, Task
from diffuser_api.errors import InvalidRequest, NotSupported
from diffuser_api.models.families import family_for
from diffuser_api.models.family import Family
from diffuser_api.models.preview_modes import latent_channels, plan_previews
from diffuser_api.models.served import ProbedModel
from diffuser_api.models.spec import ModelSpec
from diffuser_api.models.tasks import task_classes, task_extras
from diffuser_api.models.tiny import ensure_tiny_model, is_tiny_model

TINY_MODEL_NOTE = "random weights built locally: images are noise, useful only to test the API"

# The components whose configs say anything about sizes and guidance.
SHAPE_COMPONENTS = ("unet", "transformer", "vae")
# diffusers pipelines' own fallbacks when a config does not say (``default_sample_size``,
# ``vae_scale_factor`` in their ``__init__``).
DEFAULT_SAMPLE_SIZE = 128
DEFAULT_VAE_SCALE = 8


@dataclass(frozen=True)
class CheckpointShape:
    """The facts from component configs that capabilities depend on."""

    native_side: int  # the pipeline's default output side
    position_limit: int | None  # the largest side a transformer's position table covers (SD3)
    guidance_embedding: bool  # False for transformers built without one (FLUX.1-schnell)
    latent_channels: int | None = None  # the VAE's: whether the family's latent-to-RGB map fits


def checkpoint_source(spec: ModelSpec, settings: Settings) -> str:
    """The hub id or folder to read: a built-in tiny model is built into the cache first."""
    if is_tiny_model(spec.source):
        return str(ensure_tiny_model(spec.source, settings.cache_dir))
    return spec.source


def probe_model(spec: ModelSpec, settings: Settings) -> ProbedModel:
    """Capabilities and pipeline class from ``model_index.json`` and the component configs alone."""
    source = checkpoint_source(spec, settings)
    index = DiffusionPipeline.load_config(source)
    class_name = index["_class_name"]
    family = family_for(class_name, spec.family)
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        raise NotSupported(f"diffusers has no pipeline class {class_name}")
    configs = {name: _component_config(source, name, index[name]) for name in SHAPE_COMPONENTS if index.get(name)}
    shape = shape_from_configs(configs)
    return ProbedModel(derive_capabilities(pipeline_class, shape, family, spec, settings), class_name)


def _component_config(source: str, name: str, entry: Any) -> dict[str, Any]:
    """One component's ``config.json`` (its class's ``load_config`` finds it locally or on the hub)."""
    library, class_name = entry
    component_class = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if component_class is None:
        raise NotSupported(f"component {name} of {Path(source).name} is not a diffusers model ({class_name})")
    return dict(component_class.load_config(source, subfolder=name))


def pipeline_configs(pipeline: Any) -> dict[str, Mapping[str, Any]]:
    """The component configs of a pipeline in memory, as ``probe_model`` reads them from disk."""
    return {
        name: component.config
        for name in SHAPE_COMPONENTS
        if (component := getattr(pipeline, name, None)) is not None
    }


def shape_from_configs(configs: Mapping[str, Mapping[str, Any]]) -> CheckpointShape:
    """Sizes as the pipelines compute them in their ``__init__``: the UNet's (or SD3
    transformer's) sample size, else 128, times the VAE's downscale factor."""
    vae = configs.get("vae", {})
    if "temperal_downsample" in vae:  # Qwen-Image's video-style VAE
        scale = 2 ** len(vae["temperal_downsample"])
    elif "block_out_channels" in vae:
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        scale = DEFAULT_VAE_SCALE
    unet, transformer = configs.get("unet", {}), configs.get("transformer", {})
    sample = unet.get("sample_size") or transformer.get("sample_size") or DEFAULT_SAMPLE_SIZE
    table = transformer.get("pos_embed_max_size")
    return CheckpointShape(
        native_side=int(sample * scale),
        position_limit=int(table * transformer["patch_size"] * scale) if table else None,
        guidance_embedding=transformer.get("guidance_embeds", True) is not False,
        latent_channels=latent_channels(vae),
    )


def derive_capabilities(
    pipeline_class: type, shape: CheckpointShape, family: Family, spec: ModelSpec, settings: Settings
) -> Capabilities:
    """The one place capabilities come from, with the model's own defaults folded in and its
    disabled tasks taken out, so request validation reads a single object."""
    classes = task_classes(pipeline_class, family)
    extras = task_extras(classes, family)
    if not shape.guidance_embedding:
        extras = {task: names - {"guidance_scale"} for task, names in extras.items()}
    honoured = frozenset().union(*extras.values())
    max_side = min(settings.max_image_size, shape.position_limit or settings.max_image_size)
    max_side -= max_side % family.size_multiple
    side = max(settings.min_image_size, min(max_side, shape.native_side))
    side -= side % family.size_multiple
    size = SizeRules(family.size_multiple, settings.min_image_size, max_side, side, side)
    variation = (
        f"image-to-image from the input with the configured variation prompt at strength {spec.variation_strength:g}"
        if Task.VARIATION in classes
        else None
    )
    defaults = spec.defaults
    step_caches = _step_caches(family, spec)
    capabilities = Capabilities(
        family=family.name,
        tasks=frozenset(classes),
        extras=honoured,
        task_extras=extras,
        size=_with_default_size(size, defaults.size, spec, family),
        default_steps=defaults.steps or family.default_steps,
        default_guidance_scale=(
            family.default_guidance_scale if defaults.guidance_scale is None else defaults.guidance_scale
        ),
        default_strength=family.default_strength,
        default_true_cfg_scale=family.default_true_cfg_scale,
        default_negative_prompt=family.default_negative_prompt,
        negative_prompt_scale=family.negative_prompt_scale if "negative_prompt" in honoured else None,
        variation_method=variation,
        max_input_images=family.max_input_images,
        notes=((TINY_MODEL_NOTE,) if is_tiny_model(spec.source) else ()) + family.notes,
        previews=plan_previews(family, shape.latent_channels, settings.preview_mode, settings.preview_scale),
        lora=hasattr(pipeline_class, "load_lora_weights"),
        step_caches=step_caches,
        default_step_cache=spec.speed.step_cache,
    )
    return capabilities.without(spec.disabled_tasks)


def _step_caches(family: Family, spec: ModelSpec) -> frozenset[StepCacheMethod]:
    """The cache methods a request may pick: none on a compiled model (the hooks would make
    every call recompile); a configured default must be one of the family's."""
    available = frozenset() if spec.speed.compile else family.step_caches
    default = spec.speed.step_cache
    if default.on and default.method not in available:
        offered = ", ".join(sorted(available)) or "none"
        raise ModelsFileError(
            f"model '{spec.id}': speed.step_cache.method '{default.method}' is not available for family "
            f"{family.name}; available: {offered}"
        )
    return available


def _with_default_size(
    size: SizeRules, default: tuple[int, int] | None, spec: ModelSpec, family: Family
) -> SizeRules:
    """A configured default size must be one a request could ask for."""
    if default is None:
        return size
    width, height = default
    try:
        size.check(width, height, requested=f"{width}x{height}", owner=f"family {family.name}")
    except InvalidRequest as error:
        raise ModelsFileError(f"model '{spec.id}': defaults.{error.message}") from None
    return replace(size, default_width=width, default_height=height)


def probe_pipeline(pipeline: Any, family: Family, spec: ModelSpec, settings: Settings) -> ProbedModel:
    """The probe of a pipeline already in memory (a benchmark's random-weight model)."""
    shape = shape_from_configs(pipeline_configs(pipeline))
    return ProbedModel(derive_capabilities(type(pipeline), shape, family, spec, settings), type(pipeline).__name__)
