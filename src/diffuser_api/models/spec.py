"""What a served model *is*, before and apart from any loaded weights.

A spec comes from one entry of the models file (or from ``DIFFUSER_MODEL_ID`` alone) with every
per-model setting resolved, so the registry, the loader and the API read one object. A loaded
model (pipelines, runners, engine) comes and goes; its spec stays. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffuser_api.domain import LoraChoice, MemoryOptions, SpeedOptions, Task
from diffuser_api.engine import EngineLimits


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model defaults a request falls back to; None keeps the family's."""

    steps: int | None = None
    guidance_scale: float | None = None
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class RayPlacement:
    """How Ray Serve runs the model's deployment (the models file's ``ray:`` section), as
    Ray's own deployment options. Read only by ``diffuser-api serve --ray`` and ``ray-config``."""

    num_replicas: int | None = 1  # None with an autoscaling config
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = field(default_factory=dict)
    max_ongoing_requests: int = 16  # at least twice the engine's max batch size: a full batch gets in
    max_queued_requests: int = -1  # Ray's "no limit": the engine's own queue answers 429

    def deployment_options(self) -> dict[str, Any]:
        """The keyword arguments of ``serve.deployment(...)`` / a Serve config's deployment entry."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": dict(self.ray_actor_options),
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            options["num_replicas"] = self.num_replicas
        return options


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter registered for a model at start (loaded on first use). Requests name it;
    ``source`` (a local file or folder, or a hub repo) comes only from the models file."""

    name: str
    source: str
    weight_name: str | None = None  # the file inside a folder or hub repo
    scale: float = 1.0  # what a request that names no scale gets


@dataclass(frozen=True)
class PresetSpec:
    """An extra model name: a model with LoRAs and defaults applied unless a request overrides."""

    id: str
    model: str
    loras: tuple[LoraChoice, ...] = ()
    defaults: ModelDefaults = field(default_factory=ModelDefaults)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    source: str  # hub id, local folder or a built-in tiny model
    aliases: tuple[str, ...] = ()
    pinned: bool = False  # loaded at start, never evicted
    devices: tuple[str, ...] = ("auto",)
    torch_dtype: str = "auto"
    family: str | None = None  # None: detected from model_index.json
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    disabled_tasks: frozenset[Task] = frozenset()
    variation_prompt: str = ""
    variation_strength: float = 0.7
    engine: EngineLimits = field(default_factory=EngineLimits)
    warmup: bool = True
    ray: RayPlacement = field(default_factory=RayPlacement)
    adapters: tuple[AdapterSpec, ...] = ()
    max_loaded_adapters: int = 8  # LRU of adapters held in memory, per model
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)


@dataclass(frozen=True)
class ServingPlan:
    """The whole models file, resolved: which models, which is the default, and the budgets."""

    models: tuple[ModelSpec, ...]
    default: str
    max_loaded_models: int | None = None
    memory_budget_bytes: int | None = None  # per device: weights and working memory
    host_memory_budget_bytes: int | None = None  # the warm tier in host RAM; 0 turns it off
    presets: tuple[PresetSpec, ...] = ()
