"""The models file (``DIFFUSER_MODELS_FILE``): which models one server serves, and how.

It is the one schema for everything per model: later releases add their sections here (their
names are reserved now), never a second file. Unknown keys are refused, and every error names
the file's line and the key, because a typo in a budget or a model id would otherwise surface
only as a server that silently behaves differently. Without a file, ``DIFFUSER_MODEL_ID`` and the
global settings make a one-entry plan, so both roads lead to one ``ServingPlan``.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from diffuser_api.config.settings import Settings, split_list, task_names
from diffuser_api.domain import (
    CpuOffload,
    MemoryOptions,
    Quantization,
    SpeedOptions,
    StepCache,
    StepCacheMethod,
    Task,
)
from diffuser_api.engine import EngineLimits
from diffuser_api.models.spec import ModelDefaults, ModelSpec, ServingPlan

Location = tuple[str | int, ...]

# Section -> the later release that fills it; written now, they are refused rather than ignored.
RESERVED_MODEL_SECTIONS = {
    "adapters": "LoRA adapters",
    "adapters_dir": "LoRA adapters",
    "max_loaded_adapters": "LoRA adapters",
    "ray": "Ray Serve",
}

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTE_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_IMAGE_SIZE = re.compile(r"(\d+)x(\d+)")


class ModelsFileError(ValueError):
    """A models file (or a model's settings) the server will not start with; says where and why."""


def byte_size(value: object) -> int:
    """``20GiB``, ``512MiB``, ``1.5GB`` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _BYTE_SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or match[2].lower() not in _BYTE_UNITS:
        raise PydanticCustomError(
            "byte_size", "'{value}' is not a size in bytes such as 20GiB, 512MiB, 1.5GB or 1000000",
            {"value": value},
        )
    return int(float(match[1]) * _BYTE_UNITS[match[2].lower()])


def image_size(value: object) -> tuple[int, int]:
    match = _IMAGE_SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or not int(match[1]) or not int(match[2]):
        raise PydanticCustomError("image_size", "'{value}' is not a size WxH such as 1024x768", {"value": value})
    return int(match[1]), int(match[2])


def _reserved(value: object) -> object:
    raise PydanticCustomError("reserved", "this section is reserved for a later release; remove it")


def _empty(value: object) -> object:
    if value:
        raise PydanticCustomError("reserved", "presets are reserved for a later release; leave the list empty")
    return value


ByteSize = Annotated[int, BeforeValidator(byte_size)]
ImageSize = Annotated[tuple[int, int], BeforeValidator(image_size)]
Reserved = Annotated[Any, BeforeValidator(_reserved)]
TaskList = Annotated[list[Task], BeforeValidator(task_names)]
DeviceList = Annotated[list[str], BeforeValidator(split_list)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DefaultsSection(Section):
    steps: int | None = Field(None, gt=0)
    guidance_scale: float | None = Field(None, ge=0)
    size: ImageSize | None = None


class EngineSection(Section):
    max_queue_size: int | None = Field(None, gt=0)
    max_batch_size: int | None = Field(None, gt=0)
    max_batch_pixels: int | None = Field(None, gt=0)
    batch_wait_ms: float | None = Field(None, ge=0)
    request_timeout_s: float | None = Field(None, gt=0)


class StepCacheSection(Section):
    """``threshold`` tunes First-Block-Cache and MagCache, ``cache_interval`` TaylorSeer; a knob
    the method does not read is refused rather than ignored."""

    method: StepCacheMethod
    threshold: float | None = Field(None, gt=0, le=1)
    cache_interval: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _knob_of_method(self) -> StepCacheSection:
        thresholded = (StepCacheMethod.FIRST_BLOCK_CACHE, StepCacheMethod.MAGCACHE)
        if self.threshold is not None and self.method not in thresholded:
            raise PydanticCustomError("knob", "threshold applies to first_block_cache and magcache only")
        if self.cache_interval is not None and self.method is not StepCacheMethod.TAYLORSEER:
            raise PydanticCustomError("knob", "cache_interval applies to taylorseer only")
        return self


class SpeedSection(Section):
    step_cache: StepCacheSection | None = None
    compile: bool = False


class MemorySection(Section):
    quantization: Quantization = Quantization.NONE
    cpu_offload: CpuOffload = CpuOffload.NONE
    vae_tiling: bool = False


class ModelEntry(Section):
    """One served model. Every setting left out is the global ``DIFFUSER_*`` one."""

    id: str = Field(pattern=r"^\S+$")
    source: str | None = Field(None, min_length=1)
    aliases: list[Annotated[str, Field(pattern=r"^\S+$")]] = []
    pinned: bool = False
    device: DeviceList | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    family: str | None = None
    defaults: DefaultsSection = DefaultsSection()
    disabled_tasks: TaskList | None = None
    variation_prompt: str | None = None
    variation_strength: float | None = Field(None, gt=0, le=1)
    engine: EngineSection = EngineSection()
    warmup: bool | None = None
    adapters: Reserved = None
    adapters_dir: Reserved = None
    max_loaded_adapters: Reserved = None
    speed: SpeedSection = SpeedSection()
    memory: MemorySection = MemorySection()
    ray: Reserved = None


class ModelsFile(Section):
    default: str | None = None  # None: the first model
    max_loaded_models: int | None = Field(None, gt=0)
    memory_budget: ByteSize | None = Field(None, gt=0)
    host_memory_budget: ByteSize | None = None  # 0 turns the warm tier off
    models: list[ModelEntry] = Field(min_length=1)
    presets: Annotated[list[Any], BeforeValidator(_empty)] = []


def serving_plan(settings: Settings) -> ServingPlan:
    """What this server serves: the models file if one is set, else ``DIFFUSER_MODEL_ID`` alone (pinned)."""
    if settings.models_file is not None:
        return plan_from_file(read_models_file(settings.models_file), settings)
    spec = ModelSpec(
        id=settings.model_id,
        source=settings.model_id,
        pinned=True,
        devices=tuple(settings.device),
        torch_dtype=settings.torch_dtype,
        family=settings.family,
        defaults=ModelDefaults(steps=settings.default_steps, guidance_scale=settings.default_guidance_scale),
        disabled_tasks=frozenset(settings.disabled_tasks),
        variation_prompt=settings.variation_prompt,
        variation_strength=settings.variation_strength,
        engine=engine_limits(settings),
        warmup=settings.warmup,
    )
    return ServingPlan(models=(spec,), default=spec.id)


def engine_limits(settings: Settings, section: EngineSection | None = None) -> EngineLimits:
    """The global engine settings, with those an entry's ``engine`` section sets instead."""

    def pick(name: str) -> Any:
        value = getattr(section, name) if section is not None else None
        return getattr(settings, name) if value is None else value

    return EngineLimits(
        max_queue_size=pick("max_queue_size"),
        max_batch_size=pick("max_batch_size"),
        max_batch_pixels=pick("max_batch_pixels"),
        batch_wait_s=pick("batch_wait_ms") / 1000,
        request_timeout_s=pick("request_timeout_s"),
    )


def plan_from_file(file: ModelsFile, settings: Settings) -> ServingPlan:
    return ServingPlan(
        models=tuple(_spec(entry, settings) for entry in file.models),
        default=file.default or file.models[0].id,
        max_loaded_models=file.max_loaded_models,
        memory_budget_bytes=file.memory_budget,
        host_memory_budget_bytes=file.host_memory_budget,
    )


def _spec(entry: ModelEntry, settings: Settings) -> ModelSpec:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    if entry.speed.compile and not pick(entry.warmup, settings.warmup):
        raise ModelsFileError(
            f"model '{entry.id}': speed.compile needs the warm-up (compilation happens there, so no client "
            "waits for it); remove warmup: false or the compile option"
        )
    if entry.speed.compile and entry.speed.step_cache is not None:
        raise ModelsFileError(
            f"model '{entry.id}': speed.compile and speed.step_cache do not go together (the cache hooks "
            "change the compiled blocks' code, so every call would recompile); choose one"
        )

    return ModelSpec(
        id=entry.id,
        source=entry.source or entry.id,
        aliases=tuple(entry.aliases),
        pinned=entry.pinned,
        devices=tuple(pick(entry.device, settings.device)),
        torch_dtype=pick(entry.dtype, settings.torch_dtype),
        family=pick(entry.family, settings.family),
        defaults=ModelDefaults(
            steps=pick(entry.defaults.steps, settings.default_steps),
            guidance_scale=pick(entry.defaults.guidance_scale, settings.default_guidance_scale),
            size=entry.defaults.size,
        ),
        disabled_tasks=frozenset(pick(entry.disabled_tasks, settings.disabled_tasks)),
        variation_prompt=pick(entry.variation_prompt, settings.variation_prompt),
        variation_strength=pick(entry.variation_strength, settings.variation_strength),
        engine=engine_limits(settings, entry.engine),
        warmup=pick(entry.warmup, settings.warmup),
        speed=_speed(entry.speed),
        memory=MemoryOptions(entry.memory.quantization, entry.memory.cpu_offload, entry.memory.vae_tiling),
    )


def _speed(section: SpeedSection) -> SpeedOptions:
    cache = section.step_cache
    if cache is None:
        return SpeedOptions(compile=section.compile)
    return SpeedOptions(StepCache(cache.method, cache.threshold, cache.cache_interval), section.compile)


def read_models_file(path: Path) -> ModelsFile:
    """Parse and check a models file; any problem is a ``ModelsFileError`` naming its line."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ModelsFileError(f"{path}: cannot read the models file ({error.strerror})") from None
    return parse_models_file(text, str(path))


def parse_models_file(text: str, name: str = "models file") -> ModelsFile:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ModelsFileError(f"{name}{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(root, yaml.MappingNode):
        raise ModelsFileError(f"{name}: expected a mapping with a 'models' list at the top")
    lines = _key_lines(root, (), name)
    data = yaml.SafeLoader(text).get_single_data()
    try:
        file = ModelsFile.model_validate(data)
    except ValidationError as error:
        raise ModelsFileError("\n".join(_describe(problem, lines, name) for problem in error.errors())) from None
    _check_names(file, lines, name)
    return file


def _key_lines(node: yaml.Node, at: Location, name: str) -> dict[Location, int]:
    """Every key's (and list item's) line, 1-based; refuses a key written twice in one mapping,
    which YAML loaders otherwise resolve silently in favour of the last."""
    lines: dict[Location, int] = {at: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            where = (*at, key_node.value)
            if where in lines:
                raise ModelsFileError(
                    f"{name}, line {key_node.start_mark.line + 1}: key '{_dotted(where)}' is written twice"
                )
            lines.update(_key_lines(value_node, where, name))
            lines[where] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_key_lines(item, (*at, index), name))
    return lines


def _line(at: Location, lines: dict[Location, int]) -> int:
    """The line of ``at`` or, for a key that is missing, of the nearest thing around it."""
    while at not in lines:
        at = at[:-1]
    return lines[at]


def _dotted(at: Sequence[str | int]) -> str:
    text = ""
    for part in at:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def _describe(problem: Any, lines: dict[Location, int], name: str) -> str:
    at = tuple(part for part in problem["loc"] if not _is_validator_tag(part))
    line = _line(at, lines)
    if problem["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(at[:-1]))
        return f"{name}, line {line}: unknown key '{_dotted(at)}'; allowed here: {allowed}"
    if problem["type"] == "reserved" and at and at[-1] in RESERVED_MODEL_SECTIONS:
        purpose = RESERVED_MODEL_SECTIONS[str(at[-1])]
        return f"{name}, line {line}: '{_dotted(at)}' is reserved for a later release ({purpose}); remove it"
    if problem["type"] == "missing":
        return f"{name}, line {line}: '{_dotted(at)}' is required"
    return f"{name}, line {line}: '{_dotted(at)}': {problem['msg']}"


def _is_validator_tag(part: str | int) -> bool:
    """pydantic adds the branch of a union (``int``, ``function-before[...]``) to an error's place."""
    return isinstance(part, str) and (part in {"int", "str", "float", "bool", "list"} or "[" in part)


def _allowed_keys(at: Location) -> Iterator[str]:
    """The keys of the section at ``at``, found by walking the schema along the same path."""
    section: Any = ModelsFile
    for part in at:
        if isinstance(part, int):
            continue
        section = _section_type(section.model_fields[part].annotation)
    return iter(name for name in section.model_fields if name not in RESERVED_MODEL_SECTIONS)


def _section_type(annotation: Any) -> Any:
    """``list[ModelEntry]`` or ``EngineSection | None`` -> the section class inside."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for argument in typing.get_args(annotation):
            if (found := _section_type(argument)) is not None:
                return found
    return None


def _check_names(file: ModelsFile, lines: dict[Location, int], name: str) -> None:
    """Every id and alias names one model, and the default is one of the ids."""
    owners: dict[str, str] = {}
    for index, entry in enumerate(file.models):
        names = [(("models", index, "id"), entry.id)]
        names += [(("models", index, "aliases", position), alias) for position, alias in enumerate(entry.aliases)]
        for at, model_name in names:
            if model_name in owners:
                raise ModelsFileError(
                    f"{name}, line {_line(at, lines)}: '{model_name}' already names {owners[model_name]}; "
                    "every id and alias must name one model"
                )
            owners[model_name] = f"model '{entry.id}' (line {_line(('models', index), lines)})"
    ids = [entry.id for entry in file.models]
    if file.default is not None and file.default not in ids:
        raise ModelsFileError(
            f"{name}, line {_line(('default',), lines)}: default '{file.default}' is not the id of a model here; "
            f"ids: {', '.join(ids)}"
        )
