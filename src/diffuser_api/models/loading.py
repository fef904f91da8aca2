"""Turns a model spec into a loaded model: one copy of the weights per device, runners, and
the moves the registry makes with them (to host RAM and back, or away).

Hub ids, local folders and built-in tiny models all go through ``from_pretrained``, so a
real checkpoint on a GPU is only a settings change. A pipeline built in memory (a benchmark's
random-weight model) is served through the same ``runners_for_pipeline`` / ``DiffusersModel``.
What the model can do comes from ``checkpoint.py``, before any of this runs.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline

from diffuser_api.config import Settings
from diffuser_api.domain import Task
from diffuser_api.domain.devices import is_cpu
from diffuser_api.models.adapters import DeviceAdapters
from diffuser_api.models.checkpoint import checkpoint_source, pipeline_configs
from diffuser_api.models.compilation import compile_denoiser
from diffuser_api.models.cpu_threads import CpuThreads
from diffuser_api.models.families import family_for
from diffuser_api.models.family import Family
from diffuser_api.models.hotswap import HotSwapAdapters, plan_hot_swap
from diffuser_api.models.memory import (
    check_memory_options,
    place,
    quantization_kwargs,
    share_pipeline,
    stays_on_host,
    tensor_bytes,
)
from diffuser_api.models.preview_modes import PreviewMode, latent_channels, plan_previews, preview_decoder
from diffuser_api.models.runner import DiffusersRunner
from diffuser_api.models.spec import ModelSpec
from diffuser_api.models.step_cache import StepCacheGate
from diffuser_api.models.tasks import task_classes

logger = logging.getLogger(__name__)

# ``from_pretrained`` is not thread-safe: while it builds a model it patches torch.nn.Module
# for the whole process (accelerate's ``init_empty_weights``), so a second load on another
# thread gets weights on the meta device ("Cannot copy out of meta tensor"). The registry
# loads each model on a thread of its own, and two cold models asked for at once load at
# the same time: their loads take turns. Process-wide, like the patch it guards against.
_ONE_LOAD_AT_A_TIME = threading.Lock()


def resolve_devices(devices: Sequence[str]) -> list[str]:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return [auto if device == "auto" else device for device in devices]


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


class DiffusersModel:
    """A diffusers model on its devices: the registry's ``LoadedModel``.

    ``bases`` holds one pipeline per distinct device; every task pipeline and every second
    worker on a device shares its modules (``from_pipe``), so moving a base moves them all.
    Working memory is the CUDA peak beyond what was allocated once the weights were placed,
    so read ``working_bytes`` after the warm-up.
    """

    def __init__(
        self, bases: dict[str, Any], runners: Sequence[DiffusersRunner], pipeline_class: str,
        adapters: dict[str, DeviceAdapters] | None = None,
        on_host: bool = False,
    ) -> None:
        """``on_host``: the weights live in host RAM between uses (``memory.cpu_offload``)."""
        self.runners = runners
        self._adapters = adapters or {}
        self.pipeline_class = pipeline_class
        self._bases = bases
        self.can_offload = not on_host and any(not is_cpu(device) for device in bases)
        self._baseline = {device: _start_peak(device) for device in bases}

    def resident_bytes(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for device, base in self._bases.items():
            for tensor in _tensors(base):
                where = "cpu" if tensor.device.type == "cpu" else device
                totals[where] = totals.get(where, 0) + tensor_bytes(tensor)
        return totals

    def working_bytes(self) -> dict[str, int]:
        return {
            device: max(0, torch.cuda.max_memory_allocated(device) - baseline) if _is_cuda(device) else 0
            for device, baseline in self._baseline.items()
        }

    def adapter_bytes(self) -> dict[str, int]:
        """Device -> bytes of the LoRA adapters loaded there now (they come and go after loading)."""
        return {device: adapters.loaded_bytes for device, adapters in self._adapters.items() if adapters.loaded_bytes}

    def loaded_adapters(self) -> tuple[str, ...]:
        """Names of the adapters loaded now (on any device)."""
        return tuple(dict.fromkeys(name for adapters in self._adapters.values() for name in adapters.loaded_names))

    def offload(self) -> None:
        for base in self._bases.values():
            base.to("cpu")
        _free_cuda(list(self._bases))

    def restore(self) -> None:
        for device, base in self._bases.items():
            base.to(device)

    def release(self) -> None:
        devices = list(self._bases)
        self._bases = {}
        self._adapters = {}  # they hold the pipelines too
        self.runners = []
        gc.collect()
        _free_cuda(devices)


def load_model(spec: ModelSpec, settings: Settings, cpu_threads: CpuThreads | None = None) -> DiffusersModel:
    """One copy of the weights per distinct device, and one runner per listed device; runners
    on a CPU share ``cpu_threads`` (the process's). Safe to call from several threads: loads
    take turns (see ``_ONE_LOAD_AT_A_TIME``)."""
    with _ONE_LOAD_AT_A_TIME:
        return _load_model(spec, settings, cpu_threads)


def _load_model(spec: ModelSpec, settings: Settings, cpu_threads: CpuThreads | None) -> DiffusersModel:
    source = checkpoint_source(spec, settings)
    components = DiffusionPipeline.load_config(source)
    pipeline_class = components["_class_name"]
    family = family_for(pipeline_class, spec.family)
    devices = resolve_devices(spec.devices)
    check_memory_options(spec, devices)
    bases: dict[str, Any] = {}
    adapters: dict[str, DeviceAdapters] = {}
    runners: list[DiffusersRunner] = []
    for device in dict.fromkeys(devices):
        dtype = resolve_dtype(spec.torch_dtype, device)
        logger.info("loading %s (%s, family %s) on %s as %s", spec.id, pipeline_class, family.name, device, dtype)
        quantization = quantization_kwargs(spec.memory, components, dtype)
        base = DiffusionPipeline.from_pretrained(source, dtype=dtype, **family.load_kwargs(source), **quantization)
        place(base, spec.memory, device)
        adapters[device] = device_adapters(base, spec, settings)
        if spec.speed.compile:
            compile_denoiser(base)  # after the hot-swap slots exist: they are part of the graph
        bases[device] = base
        workers = [name for name in devices if name == device]
        runners += runners_for_pipeline(
            base, family, workers, settings.preview_mode, settings.preview_scale, adapters[device], cpu_threads
        )
    return DiffusersModel(bases, runners, pipeline_class, adapters, on_host=stays_on_host(spec.memory))


def device_adapters(base: Any, spec: ModelSpec, settings: Settings) -> DeviceAdapters:
    """A compiled model's adapters are hot-swapped (see ``hotswap``), so switching them never
    recompiles; the others are loaded and switched with ``set_adapters``."""
    slots = min(len(spec.adapters), settings.max_loras_per_request)
    if spec.speed.compile and slots:
        return HotSwapAdapters(base, spec.adapters, plan_hot_swap(base, spec.adapters, slots, spec.id), spec.id)
    return DeviceAdapters(base, spec.adapters, spec.max_loaded_adapters, spec.id)


def runners_for_pipeline(
    base: Any,
    family: Family,
    devices: Sequence[str],
    preview_mode: PreviewMode = "latent",
    preview_scale: float = 0.25,
    adapters: DeviceAdapters | None = None,
    cpu_threads: CpuThreads | None = None,
) -> list[DiffusersRunner]:
    """Serve a pipeline that already sits on its device: one runner per entry of ``devices``
    (all naming that device), sharing its weights and its LoRA ``adapters``, and on a CPU the
    process's cores (``cpu_threads``). Previews as the probe planned them (the defaults are the
    settings' defaults)."""
    channels = latent_channels(pipeline_configs(base).get("vae", {}))
    preview = preview_decoder(family, plan_previews(family, channels, preview_mode, preview_scale), preview_scale)
    runners: list[DiffusersRunner] = []
    denoiser = getattr(base, "transformer", None)
    gate = StepCacheGate(denoiser) if family.step_caches and denoiser is not None else None
    cores = cpu_threads if devices and is_cpu(devices[0]) else None
    for index, device in enumerate(devices):
        # A second worker on a device shares its weights but needs its own scheduler:
        # schedulers keep per-call state and break when two threads step one.
        pipe = (
            base
            if index == 0
            else share_pipeline(type(base), base, scheduler=copy.deepcopy(base.scheduler))
        )
        runners.append(
            DiffusersRunner(f"{device}#{index}", family, task_pipelines(pipe, family), preview, adapters, gate, cores)
        )
    return runners


def task_pipelines(base: Any, family: Family) -> dict[Task, Any]:
    """Every task the pipeline's diffusers family offers, all sharing the base's modules."""
    converted: dict[type, Any] = {type(base): base}
    pipelines: dict[Task, Any] = {}
    for task, task_class in task_classes(type(base), family).items():
        if task_class not in converted:
            converted[task_class] = share_pipeline(task_class, base)
        pipelines[task] = converted[task_class]
    for pipeline in converted.values():
        pipeline.set_progress_bar_config(disable=True)
    return pipelines


def _tensors(pipeline: Any) -> list[torch.Tensor]:
    """Parameters and buffers of every module of a pipeline, each counted once."""
    seen: dict[int, torch.Tensor] = {}
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def _start_peak(device: str) -> int:
    """Start measuring a device's peak; returns what is allocated there now (0 off CUDA)."""
    if not _is_cuda(device):
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _free_cuda(devices: Iterable[str]) -> None:
    for device in devices:
        if _is_cuda(device):
            with torch.cuda.device(device):
                torch.cuda.empty_cache()
