"""Turns a model id into runners: resolve the source, load once per device, derive tasks.

Hub ids, local folders and built-in tiny models all go through ``from_pretrained``, so a
real checkpoint on a GPU is only a settings change. A pipeline built in memory (a benchmark's
random-weight model) is served through the same ``runners_for_pipeline``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from diffuser_api.domain import Capabilities, SizeRules, Task
from diffuser_api.models.families import family_for
from diffuser_api.models.family import Family
from diffuser_api.models.registry import LoadedRunners
from diffuser_api.models.runner import DiffusersRunner
from diffuser_api.models.tasks import task_classes, task_extras
from diffuser_api.models.tiny import ensure_tiny_model, is_tiny_model

logger = logging.getLogger(__name__)

TINY_MODEL_NOTE = "random weights built locally: images are noise, useful only to test the API"


@dataclass(frozen=True)
class LoadOptions:
    model_id: str
    cache_dir: Path
    devices: tuple[str, ...]
    torch_dtype: str
    min_image_size: int
    max_image_size: int
    variation_strength: float
    preview_scale: float = 1.0
    family: str | None = None


def resolve_devices(devices: tuple[str, ...]) -> list[str]:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return [auto if device == "auto" else device for device in devices]


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_model(options: LoadOptions) -> LoadedRunners:
    """One copy of the weights per distinct device, and one runner per listed device."""
    tiny = is_tiny_model(options.model_id)
    source = str(ensure_tiny_model(options.model_id, options.cache_dir)) if tiny else options.model_id
    pipeline_class = DiffusionPipeline.load_config(source)["_class_name"]
    family = family_for(pipeline_class, options.family)
    devices = resolve_devices(options.devices)
    loaded: list[LoadedRunners] = []
    for device in dict.fromkeys(devices):
        dtype = resolve_dtype(options.torch_dtype, device)
        logger.info(
            "loading %s (%s, family %s) on %s as %s", options.model_id, pipeline_class, family.name, device, dtype
        )
        base = DiffusionPipeline.from_pretrained(source, dtype=dtype, **family.load_kwargs(source)).to(device)
        workers = tuple(d for d in devices if d == device)
        loaded.append(runners_for_pipeline(base, family, replace(options, devices=workers), tiny=tiny))
    return LoadedRunners(
        capabilities=loaded[0].capabilities,
        runners=[runner for part in loaded for runner in part.runners],
        pipeline_class=pipeline_class,
    )


def runners_for_pipeline(base: Any, family: Family, options: LoadOptions, *, tiny: bool = False) -> LoadedRunners:
    """Serve a pipeline that already sits on its device: one runner per entry of
    ``options.devices`` (all naming that device), sharing its weights."""
    runners: list[DiffusersRunner] = []
    for index, device in enumerate(options.devices):
        # A second worker on a device shares its weights but needs its own scheduler:
        # schedulers keep per-call state and break when two threads step one.
        pipe = (
            base
            if index == 0
            else type(base).from_pipe(base, scheduler=copy.deepcopy(base.scheduler), dtype=base.dtype)
        )
        runners.append(
            DiffusersRunner(f"{device}#{index}", family, task_pipelines(pipe, family), options.preview_scale)
        )
    capabilities = derive_capabilities(runners[0].pipelines, family, options, tiny)
    return LoadedRunners(capabilities=capabilities, runners=runners, pipeline_class=type(base).__name__)


def task_pipelines(base: Any, family: Family) -> dict[Task, Any]:
    """Every task the pipeline's diffusers family offers, all sharing the base's modules."""
    converted: dict[type, Any] = {type(base): base}
    pipelines: dict[Task, Any] = {}
    for task, task_class in task_classes(type(base), family).items():
        if task_class not in converted:
            converted[task_class] = task_class.from_pipe(base, dtype=base.dtype)
        pipelines[task] = converted[task_class]
    for pipeline in converted.values():
        pipeline.set_progress_bar_config(disable=True)
    return pipelines


def native_size(pipeline: Any) -> int:
    sample = getattr(pipeline, "default_sample_size", None)
    if sample is None and getattr(pipeline, "unet", None) is not None:
        sample = pipeline.unet.config.sample_size
    return int(sample * getattr(pipeline, "vae_scale_factor", 8)) if sample else 1024


def position_limit(pipeline: Any) -> int | None:
    """The largest side a transformer's position table covers (SD3's ``pos_embed_max_size``)."""
    config = getattr(getattr(pipeline, "transformer", None), "config", None)
    table = getattr(config, "pos_embed_max_size", None)
    if not table:
        return None
    return int(table * config.patch_size * getattr(pipeline, "vae_scale_factor", 8))


def has_guidance_embedding(pipeline: Any) -> bool:
    """False for transformers built without one (FLUX.1-schnell): guidance_scale does nothing."""
    config = getattr(getattr(pipeline, "transformer", None), "config", None)
    return getattr(config, "guidance_embeds", True) is not False


def derive_capabilities(pipelines: dict[Task, Any], family: Family, options: LoadOptions, tiny: bool) -> Capabilities:
    first = next(iter(pipelines.values()))
    extras = task_extras({task: type(pipe) for task, pipe in pipelines.items()}, family)
    if not has_guidance_embedding(first):
        extras = {task: names - {"guidance_scale"} for task, names in extras.items()}
    honoured = frozenset().union(*extras.values())
    max_side = min(options.max_image_size, position_limit(first) or options.max_image_size)
    max_side -= max_side % family.size_multiple
    side = max(options.min_image_size, min(max_side, native_size(first)))
    side -= side % family.size_multiple
    variation = (
        f"image-to-image from the input with the configured variation prompt at strength {options.variation_strength:g}"
        if Task.VARIATION in pipelines
        else None
    )
    return Capabilities(
        family=family.name,
        tasks=frozenset(pipelines),
        extras=honoured,
        task_extras=extras,
        size=SizeRules(family.size_multiple, options.min_image_size, max_side, side, side),
        default_steps=family.default_steps,
        default_guidance_scale=family.default_guidance_scale,
        default_strength=family.default_strength,
        default_true_cfg_scale=family.default_true_cfg_scale,
        default_negative_prompt=family.default_negative_prompt,
        negative_prompt_scale=family.negative_prompt_scale if "negative_prompt" in honoured else None,
        variation_method=variation,
        max_input_images=family.max_input_images,
        notes=((TINY_MODEL_NOTE,) if tiny else ()) + family.notes,
    )
