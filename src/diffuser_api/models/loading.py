"""Turns a model id into runners: resolve the source, load once per device, derive tasks.

Hub ids, local folders and built-in tiny models all go through ``from_pretrained``, so a
real checkpoint on a GPU is only a settings change.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    _get_task_class,
)

from diffuser_api.domain import Capabilities, SizeRules, Task
from diffuser_api.models.families import family_for
from diffuser_api.models.family import SIGNATURE_EXTRAS, UNIVERSAL_EXTRAS, Family
from diffuser_api.models.registry import LoadedRunners
from diffuser_api.models.runner import DiffusersRunner
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
    source = (
        str(ensure_tiny_model(options.model_id, options.cache_dir))
        if is_tiny_model(options.model_id)
        else options.model_id
    )
    pipeline_class = DiffusionPipeline.load_config(source)["_class_name"]
    family = family_for(pipeline_class, options.family)
    runners: list[DiffusersRunner] = []
    bases: dict[str, Any] = {}
    for index, device in enumerate(resolve_devices(options.devices)):
        if device in bases:
            # A second worker on a device shares its weights but needs its own scheduler:
            # schedulers keep per-call state and break when two threads step one.
            first = bases[device]
            base = type(first).from_pipe(first, scheduler=copy.deepcopy(first.scheduler), dtype=first.dtype)
        else:
            dtype = resolve_dtype(options.torch_dtype, device)
            logger.info("loading %s (%s) on %s as %s", options.model_id, pipeline_class, device, dtype)
            base = DiffusionPipeline.from_pretrained(source, dtype=dtype, **family.load_kwargs(source))
            base = base.to(device)
            bases[device] = base
        runners.append(
            DiffusersRunner(f"{device}#{index}", family, task_pipelines(base, family), options.preview_scale)
        )
    capabilities = derive_capabilities(runners[0].pipelines, family, options, is_tiny_model(options.model_id))
    return LoadedRunners(capabilities=capabilities, runners=runners, pipeline_class=pipeline_class)


def task_pipelines(base: Any, family: Family) -> dict[Task, Any]:
    """Every task the pipeline's diffusers family offers, all sharing the base's modules."""
    name = type(base).__name__
    pipelines: dict[Task, Any] = {}
    if type(base) in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values():
        pipelines[Task.GENERATION] = base
    for task, mapping in (
        (Task.EDIT, AUTO_IMAGE2IMAGE_PIPELINES_MAPPING),
        (Task.MASKED_EDIT, AUTO_INPAINT_PIPELINES_MAPPING),
    ):
        task_class = _get_task_class(mapping, name, throw_error_if_not_exist=False)
        if task_class is not None:
            pipelines[task] = base if task_class is type(base) else task_class.from_pipe(base, dtype=base.dtype)
    if family.max_input_images > 1 and Task.EDIT in pipelines:
        pipelines[Task.MULTI_IMAGE_EDIT] = pipelines[Task.EDIT]
    if Task.EDIT in pipelines and _takes(pipelines[Task.EDIT], "strength"):
        pipelines[Task.VARIATION] = pipelines[Task.EDIT]
    for pipeline in pipelines.values():
        pipeline.set_progress_bar_config(disable=True)
    return pipelines


def _takes(pipeline: Any, parameter: str) -> bool:
    return parameter in inspect.signature(pipeline.__call__).parameters


def native_size(pipeline: Any) -> int:
    sample = getattr(pipeline, "default_sample_size", None)
    if sample is None and getattr(pipeline, "unet", None) is not None:
        sample = pipeline.unet.config.sample_size
    return int(sample * getattr(pipeline, "vae_scale_factor", 8)) if sample else 1024


def derive_capabilities(pipelines: dict[Task, Any], family: Family, options: LoadOptions, tiny: bool) -> Capabilities:
    extras = set(UNIVERSAL_EXTRAS)
    for parameter in SIGNATURE_EXTRAS:
        if any(_takes(pipeline, parameter) for pipeline in pipelines.values()):
            extras.add(parameter)
    side = max(options.min_image_size, min(options.max_image_size, native_size(next(iter(pipelines.values())))))
    side -= side % family.size_multiple
    variation = (
        f"image-to-image from the input with the configured variation prompt at strength {options.variation_strength:g}"
        if Task.VARIATION in pipelines
        else None
    )
    return Capabilities(
        family=family.name,
        tasks=frozenset(pipelines),
        extras=frozenset(extras - family.ignored_extras),
        size=SizeRules(family.size_multiple, options.min_image_size, options.max_image_size, side, side),
        default_steps=family.default_steps,
        default_guidance_scale=family.default_guidance_scale,
        default_strength=family.default_strength,
        variation_method=variation,
        max_input_images=family.max_input_images,
        notes=((TINY_MODEL_NOTE,) if tiny else ()) + family.notes,
    )
