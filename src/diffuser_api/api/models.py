"""``/v1/models`` in OpenAI's format plus each model's status, and the admin routes that load
and unload a model. Every route sees only the models the caller's key may use: the others
answer 404 ``model_not_found``, as if they did not exist."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from diffuser_api.api.dependencies import AdminDep, AllowedModelsDep, RegistryDep
from diffuser_api.api.responses import ModelCard, ModelDetails, ModelList, PresetDetails, error_responses
from diffuser_api.domain import Capabilities, Task
from diffuser_api.models.registry import ModelStatus, Route, ServedModel

router = APIRouter(tags=["models"])

# Statuses whose ``reason`` a caller needs: why it cannot serve right now.
EXPLAINED = (ModelStatus.LOADING, ModelStatus.FAILED)


def model_card(model: ServedModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": "diffuser-api",
            "status": model.status.value}


def preset_card(route: Route) -> dict[str, Any]:
    """A preset is listed like a model; ``parent`` names the model it runs on (as vLLM lists
    LoRA models), and its status is that model's."""
    assert route.preset is not None
    return model_card(route.model) | {"id": route.preset.id, "parent": route.model.id}


def preset_details(route: Route) -> dict[str, Any]:
    preset = route.preset
    assert preset is not None
    defaults = {"steps": preset.defaults.steps, "guidance_scale": preset.defaults.guidance_scale,
                "size": f"{preset.defaults.size[0]}x{preset.defaults.size[1]}" if preset.defaults.size else None}
    return preset_card(route) | {
        "loras": [{"name": lora.name, "scale": lora.scale} for lora in preset.loras],
        "defaults": {key: value for key, value in defaults.items() if value is not None},
    }


def adapters_of(model: ServedModel) -> list[dict[str, Any]]:
    """The model's registered LoRA adapters, their default scales, and which are loaded now."""
    loaded = set(model.loaded_adapters())
    return [{"name": adapter.name, "scale": adapter.scale, "loaded": adapter.name in loaded}
            for adapter in model.spec.adapters]


def describe_model(model: ServedModel) -> dict[str, Any]:
    """What a model can do, for ``GET /`` and ``GET /v1/models/{id}``: known from the
    checkpoint before any load, so a cold model is described without loading it. A checkpoint
    that could not even be read has only its status and reason."""
    described: dict[str, Any] = {"id": model.id, "status": model.status.value}
    if model.status in EXPLAINED:
        described["reason"] = model.unavailable().message
    if not model.probed:
        return described
    caps = model.capabilities
    described.update(
        family=caps.family,
        pipeline=model.pipeline_class,
        notes=list(caps.notes),
        endpoints=_endpoints(caps),
        extras=sorted(caps.extras),
        lora=caps.lora,
        sizes={"rule": caps.size.describe(), "default": f"{caps.size.default_width}x{caps.size.default_height}"},
        defaults={"steps": caps.default_steps, "guidance_scale": caps.default_guidance_scale,
                  "strength": caps.default_strength},
        previews={"mode": caps.previews.mode, "method": caps.previews.method},
    )
    return described


def model_details(model: ServedModel) -> dict[str, Any]:
    """The card, the description, and where the model is now."""
    details = model_card(model) | describe_model(model) | {
        "devices": list(model.devices),
        "resident_bytes": model.resident_bytes(),
        "pinned": model.spec.pinned,
        "loads": model.loads,
        "evictions": {kind: model.evictions.get(kind, 0) for kind in ("host", "released")},
        "queue_depth": model.queue_depth(),
        "adapters": adapters_of(model),
        "max_loaded_adapters": model.spec.max_loaded_adapters,
        "memory": dataclasses.asdict(model.spec.memory),
    }
    if model.probed:
        details["speed"] = _speed(model)
    if model.load_seconds is not None:
        details["load_seconds"] = round(model.load_seconds, 3)
    if model.last_used is not None:
        details["last_used_at"] = int(model.last_used)
    return details


def _speed(model: ServedModel) -> dict[str, Any]:
    caps = model.capabilities
    default = caps.default_step_cache
    step_cache: dict[str, Any] = {"default": default.method.value,
                                  "methods": ["off", *sorted(method.value for method in caps.step_caches)]}
    if default.threshold is not None:
        step_cache["threshold"] = default.threshold
    if default.cache_interval is not None:
        step_cache["cache_interval"] = default.cache_interval
    return {"step_cache": step_cache, "compile": model.spec.speed.compile}


def _endpoints(caps: Capabilities) -> dict[str, Any]:
    def has(task: Task) -> bool:
        return task in caps.tasks

    return {
        "generations": {"supported": has(Task.GENERATION)},
        "edits": {
            "supported": has(Task.EDIT),
            "mask": has(Task.MASKED_EDIT),
            "multiple_images": has(Task.MULTI_IMAGE_EDIT),
            "max_images": caps.max_input_images,
        },
        "variations": {"supported": has(Task.VARIATION), "method": caps.variation_method},
    }


@router.get(
    "/models", summary="List the models this key may use, with their status", response_model=None,
    responses={200: {"model": ModelList, "description": "The served models"}} | error_responses(),
)
async def list_models(registry: RegistryDep, allowed: AllowedModelsDep) -> dict[str, Any]:
    models = [model_card(model) for model in registry if allowed is None or model.id in allowed]
    return {"object": "list", "data": models + [preset_card(route) for route in registry.presets(allowed)]}


@router.get(
    "/models/{model_id:path}",
    summary="Describe one served model (status, devices, memory, capabilities, adapters) or preset",
    response_model=None,
    responses={200: {"model": ModelDetails | PresetDetails, "description": "The model, or the preset"}}
    | error_responses(404),
)
async def get_model(model_id: str, registry: RegistryDep, allowed: AllowedModelsDep) -> dict[str, Any]:
    if (preset := registry.preset(model_id, allowed)) is not None:
        return preset_details(preset)
    return model_details(registry.get(model_id, allowed))


def _admin_answers(action: str) -> dict[int | str, dict[str, Any]]:
    return {
        202: {"model": ModelCard, "description": f"The {action} started; poll GET /v1/models/{{id}} for its status"},
        200: {"model": ModelCard, "description": f"Nothing to do: already {action}ed"
              + (" (or in host memory)" if action == "unload" else "")},
    } | error_responses(403, 404)


@router.post(
    "/models/{model_id:path}/load", summary="Load a model now (admin)", response_model=None,
    dependencies=[AdminDep], responses=_admin_answers("load"),
)
async def load_model(model_id: str, registry: RegistryDep, allowed: AllowedModelsDep) -> JSONResponse:
    """A started load may first wait for evictions, so the model reads ``unloaded`` a moment
    longer; the answer says ``loading``, which is what the caller started."""
    model = registry.get(model_id, allowed)
    if registry.start_load(model.id):
        return JSONResponse(model_card(model) | {"status": ModelStatus.LOADING.value}, status_code=202)
    return JSONResponse(model_card(model))


@router.post(
    "/models/{model_id:path}/unload", summary="Unload a model now; a running batch finishes first (admin)",
    response_model=None, dependencies=[AdminDep], responses=_admin_answers("unload"),
)
async def unload_model(model_id: str, registry: RegistryDep, allowed: AllowedModelsDep) -> JSONResponse:
    """The answer has the status of the moment: ``ready`` while a running batch finishes."""
    model = registry.get(model_id, allowed)
    started = registry.start_unload(model.id)
    return JSONResponse(model_card(model), status_code=202 if started else 200)
