"""What a served model *is*, before and apart from any loaded weights.

A spec comes from one entry of the models file (or from ``DIFFUSER_MODEL_ID`` alone) with every
per-model setting resolved, so the registry, the loader and the API read one object. A loaded
model (pipelines, runners, engine) comes and goes; its spec stays. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffuser_api.domain import MemoryOptions, SpeedOptions, Task
from diffuser_api.engine import EngineLimits


@dataclass(frozen=True)
class ModelDefaults:
    """Per-model defaults a request falls back to; None keeps the family's."""

    steps: int | None = None
    guidance_scale: float | None = None
    size: tuple[int, int] | None = None


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
