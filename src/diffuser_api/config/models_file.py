"""The models file (``DIFFUSER_MODELS_FILE``): which models one server serves, and how.

It is the one schema for everything per model (serving, LoRA adapters and presets, speed and
memory options, Ray Serve placement), never a second file. Unknown keys are refused, and every error names
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
    LoraChoice,
    MemoryOptions,
    Quantization,
    SpeedOptions,
    StepCache,
    StepCacheMethod,
    Task,
)
from diffuser_api.engine import EngineLimits
from diffuser_api.models.spec import AdapterSpec, ModelDefaults, ModelSpec, PresetSpec, RayPlacement, ServingPlan

Location = tuple[str | int, ...]

# Ray's deployment default (5) would cap every batch at 5 requests: a replica lets in at least
# twice the engine's max batch size, so one batch runs while the next one fills.
ONGOING_PER_BATCH = 2

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTE_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_IMAGE_SIZE = re.compile(r"(\d+)x(\d+)")
# An adapter's name: what requests send. No slash, colon or dot, so a name can never be read as
# a path or URL (requests name adapters, never files); torch module names take no dot either.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_+-]*$"
_ADAPTER_NAME = re.compile(ADAPTER_NAME)
# Sources starting so are files or folders, relative to the models file's folder; any other
# source is a hub repo id.
_LOCAL_PREFIXES = (".", "/", "~")


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


ByteSize = Annotated[int, BeforeValidator(byte_size)]
ImageSize = Annotated[tuple[int, int], BeforeValidator(image_size)]
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


class AutoscalingSection(Section):
    """Ray Serve's ``autoscaling_config``; ``min_replicas: 0`` lets an idle model scale to zero."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float | None = Field(None, gt=0)
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)


class ActorOptionsSection(Section):
    """Ray's ``ray_actor_options`` for each replica; fractional CPUs and GPUs are allowed."""

    num_gpus: float = Field(0, ge=0)
    num_cpus: float | None = Field(None, ge=0)
    memory: ByteSize | None = Field(None, gt=0)


class RaySection(Section):
    """How ``serve --ray`` / ``ray-config`` deploy the model: Ray Serve's deployment options."""

    num_replicas: int | None = Field(None, gt=0)  # zero replicas: autoscaling_config.min_replicas 0
    autoscaling_config: AutoscalingSection | None = None
    ray_actor_options: ActorOptionsSection = ActorOptionsSection()
    max_ongoing_requests: int | None = Field(None, gt=0)
    max_queued_requests: int | None = Field(None, ge=-1)


class AdapterSection(Section):
    source: str = Field(min_length=1)  # a local file or folder (./, /, ~) or a hub repo id
    weight_name: str | None = None  # the file inside a folder or repo
    scale: float = 1.0


class LoraSection(Section):
    name: str
    scale: float | None = None  # None: the adapter's configured scale


class PresetEntry(Section):
    """An extra model name: a model with LoRAs and defaults, routed like a model."""

    id: str = Field(pattern=r"^\S+$")
    model: str
    loras: list[LoraSection] = []
    defaults: DefaultsSection = DefaultsSection()


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
    adapters: dict[Annotated[str, Field(pattern=ADAPTER_NAME)], AdapterSection] = {}
    adapters_dir: str | None = None  # every *.safetensors in it, named by its file name
    max_loaded_adapters: int | None = Field(None, gt=0)
    speed: SpeedSection = SpeedSection()
    memory: MemorySection = MemorySection()
    ray: RaySection = RaySection()


class ModelsFile(Section):
    default: str | None = None  # None: the first model
    max_loaded_models: int | None = Field(None, gt=0)
    memory_budget: ByteSize | None = Field(None, gt=0)
    host_memory_budget: ByteSize | None = None  # 0 turns the warm tier off
    models: list[ModelEntry] = Field(min_length=1)
    presets: list[PresetEntry] = []


def serving_plan(settings: Settings) -> ServingPlan:
    """What this server serves: the models file if one is set, else ``DIFFUSER_MODEL_ID`` alone (pinned)."""
    if settings.models_file is not None:
        file = read_models_file(settings.models_file)
        try:
            return plan_from_file(file, settings, settings.models_file.parent)
        except ModelsFileError as error:
            raise ModelsFileError(f"{settings.models_file}: {error}") from None
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
        ray=ray_placement(settings.model_id, RaySection(), engine_limits(settings)),
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
        # One for every model: device turns compare the classes of different models' work.
        priority_ageing_s=settings.priority_ageing_s,
    )


def plan_from_file(file: ModelsFile, settings: Settings, folder: Path | None = None) -> ServingPlan:
    """``folder`` (the models file's) is where relative adapter paths start; default: here."""
    folder = folder or Path.cwd()
    models = tuple(_spec(entry, settings, folder) for entry in file.models)
    return ServingPlan(
        models=models,
        default=file.default or file.models[0].id,
        max_loaded_models=file.max_loaded_models,
        memory_budget_bytes=file.memory_budget,
        host_memory_budget_bytes=file.host_memory_budget,
        presets=tuple(_preset(preset, file, models, settings) for preset in file.presets),
    )


def _adapters(entry: ModelEntry, folder: Path) -> tuple[AdapterSpec, ...]:
    """The entry's ``adapters``, plus every ``*.safetensors`` of ``adapters_dir`` named by its
    file name (an explicit entry of the same name wins: it may set the scale)."""
    found: dict[str, AdapterSpec] = {}
    if entry.adapters_dir is not None:
        directory = _local_path(entry.adapters_dir, folder)
        if not directory.is_dir():
            raise ModelsFileError(f"model '{entry.id}': adapters_dir '{entry.adapters_dir}' is not a folder")
        for file in sorted(directory.glob("*.safetensors")):
            if not _ADAPTER_NAME.match(file.stem):
                raise ModelsFileError(
                    f"model '{entry.id}': '{file.name}' in adapters_dir is not a usable adapter name "
                    "(letters, digits, and _ + - after the first)"
                )
            found[file.stem] = AdapterSpec(name=file.stem, source=str(file))
    for name, adapter in entry.adapters.items():
        source = adapter.source
        if source.startswith(_LOCAL_PREFIXES):
            source = str(_local_path(source, folder))
        found[name] = AdapterSpec(name=name, source=source, weight_name=adapter.weight_name, scale=adapter.scale)
    return tuple(found.values())


def _local_path(path: str, folder: Path) -> Path:
    return (folder / Path(path).expanduser()).resolve()


def _preset(preset: PresetEntry, file: ModelsFile, models: Sequence[ModelSpec], settings: Settings) -> PresetSpec:
    """A preset names a model (id or alias) and only adapters that model registers."""
    model = next(spec for spec in models if preset.model in (spec.id, *spec.aliases))
    registered = {adapter.name for adapter in model.adapters}
    for lora in preset.loras:
        if lora.name not in registered:
            raise ModelsFileError(
                f"preset '{preset.id}': '{lora.name}' is not an adapter of model '{model.id}'; "
                f"its adapters: {', '.join(sorted(registered)) or 'none'}"
            )
        if lora.scale is not None and abs(lora.scale) > settings.max_lora_scale:
            raise ModelsFileError(
                f"preset '{preset.id}': scale {lora.scale:g} of '{lora.name}' is beyond "
                f"DIFFUSER_MAX_LORA_SCALE ({settings.max_lora_scale:g})"
            )
    if len(preset.loras) > settings.max_loras_per_request:
        raise ModelsFileError(
            f"preset '{preset.id}' names {len(preset.loras)} adapters, more than DIFFUSER_MAX_LORAS_PER_REQUEST "
            f"({settings.max_loras_per_request})"
        )
    return PresetSpec(
        id=preset.id,
        model=model.id,
        loras=tuple(LoraChoice(lora.name, lora.scale) for lora in preset.loras),
        defaults=ModelDefaults(preset.defaults.steps, preset.defaults.guidance_scale, preset.defaults.size),
    )


def _spec(entry: ModelEntry, settings: Settings, folder: Path) -> ModelSpec:
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
    adapters = _adapters(entry, folder)
    max_loaded_adapters = pick(entry.max_loaded_adapters, settings.max_loaded_adapters)
    hot_swap_slots = min(len(adapters), settings.max_loras_per_request)
    if entry.speed.compile and max_loaded_adapters < hot_swap_slots:
        raise ModelsFileError(
            f"model '{entry.id}': with speed.compile, LoRA adapters are hot-swapped into one slot per adapter a "
            f"request may name ({hot_swap_slots}), all held at once; max_loaded_adapters ({max_loaded_adapters}) "
            "must be at least that (or lower DIFFUSER_MAX_LORAS_PER_REQUEST)"
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
        ray=ray_placement(entry.id, entry.ray, engine_limits(settings, entry.engine)),
        adapters=adapters,
        max_loaded_adapters=max_loaded_adapters,
        speed=_speed(entry.speed),
        memory=MemoryOptions(entry.memory.quantization, entry.memory.cpu_offload, entry.memory.vae_tiling),
    )


def ray_placement(model_id: str, section: RaySection, engine: EngineLimits) -> RayPlacement:
    """The entry's ``ray:`` section with the defaults that fit batching filled in."""
    least_ongoing = ONGOING_PER_BATCH * engine.max_batch_size
    if section.max_ongoing_requests is not None and section.max_ongoing_requests < least_ongoing:
        raise ModelsFileError(
            f"model '{model_id}': ray.max_ongoing_requests ({section.max_ongoing_requests}) must be at least "
            f"{least_ongoing}, twice the engine's max_batch_size ({engine.max_batch_size}), or batches stay small"
        )
    if section.num_replicas is not None and section.autoscaling_config is not None:
        raise ModelsFileError(f"model '{model_id}': set ray.num_replicas or ray.autoscaling_config, not both")
    scaling = section.autoscaling_config
    if scaling is not None and scaling.max_replicas < scaling.min_replicas:
        raise ModelsFileError(
            f"model '{model_id}': ray.autoscaling_config.max_replicas ({scaling.max_replicas}) is below "
            f"min_replicas ({scaling.min_replicas})"
        )
    return RayPlacement(
        num_replicas=None if scaling is not None else (1 if section.num_replicas is None else section.num_replicas),
        autoscaling_config=None if scaling is None else scaling.model_dump(exclude_none=True),
        ray_actor_options=section.ray_actor_options.model_dump(exclude_none=True),
        max_ongoing_requests=section.max_ongoing_requests or least_ongoing,
        max_queued_requests=-1 if section.max_queued_requests is None else section.max_queued_requests,
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
    if problem["type"] == "missing":
        return f"{name}, line {line}: '{_dotted(at)}' is required"
    return f"{name}, line {line}: '{_dotted(at)}': {problem['msg']}"


def _is_validator_tag(part: str | int) -> bool:
    """pydantic adds the branch of a union (``int``, ``function-before[...]``) to an error's place."""
    return isinstance(part, str) and (part in {"int", "str", "float", "bool", "list"} or "[" in part)


def _allowed_keys(at: Location) -> Iterator[str]:
    """The keys of the section at ``at``, found by walking the schema along the same path."""
    section: Any = ModelsFile
    keyed = False  # the last part was a mapping of names (adapters): the next part is a name
    for part in at:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        annotation = section.model_fields[part].annotation
        keyed = typing.get_origin(annotation) is dict
        section = _section_type(annotation)
    return iter(section.model_fields)


def _section_type(annotation: Any) -> Any:
    """``list[ModelEntry]`` or ``EngineSection | None`` -> the section class inside."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, dict, typing.Union, types.UnionType):
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
    for index, preset in enumerate(file.presets):
        at = ("presets", index, "id")
        if preset.id in owners:
            raise ModelsFileError(
                f"{name}, line {_line(at, lines)}: preset '{preset.id}' already names {owners[preset.id]}; "
                "every id, alias and preset must name one thing"
            )
        owners[preset.id] = f"preset '{preset.id}' (line {_line(('presets', index), lines)})"
        if not any(preset.model in (entry.id, *entry.aliases) for entry in file.models):
            raise ModelsFileError(
                f"{name}, line {_line(('presets', index, 'model'), lines)}: preset '{preset.id}' names model "
                f"'{preset.model}', which is no id or alias here; ids: {', '.join(entry.id for entry in file.models)}"
            )
    ids = [entry.id for entry in file.models]
    if file.default is not None and file.default not in ids:
        raise ModelsFileError(
            f"{name}, line {_line(('default',), lines)}: default '{file.default}' is not the id of a model here; "
            f"ids: {', '.join(ids)}"
        )
