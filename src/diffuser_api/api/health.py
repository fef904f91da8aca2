"""``/health`` for orchestrators and ``/`` for people: what is served and what it can do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from diffuser_api import __version__
from diffuser_api.api.dependencies import RegistryDep, SettingsDep
from diffuser_api.api.rate_limits import describe_limits
from diffuser_api.api.responses import HealthResponse, ServiceInfo, error_responses
from diffuser_api.domain import Capabilities, Task
from diffuser_api.models.registry import ModelStatus, ServedModel

router = APIRouter(tags=["service"])


@router.get(
    "/health", summary="200 when every model is ready, 503 while loading", response_model=None,
    responses={200: {"model": HealthResponse, "description": "Every model is ready"}} | error_responses(keyed=False),
)
async def health(registry: RegistryDep) -> dict[str, str]:
    """Public (no key), so it says only ready or why not in our own words: never paths or the
    loader's exception, which the server's log has."""
    if (problem := registry.health_problem()) is not None:
        raise problem
    return {"status": "ok"}


@router.get(
    "/", summary="Service information: models and what each endpoint can do", response_model=None,
    responses={200: {"model": ServiceInfo, "description": "What is served and how"}} | error_responses(),
)
async def service_info(registry: RegistryDep, settings: SettingsDep, request: Request) -> dict[str, Any]:
    return {
        "service": "diffuser-api",
        "version": __version__,
        "api_prefix": settings.api_prefix,
        "docs": "/docs",
        "models": [_describe(handle) for handle in registry],
        "caller": describe_limits(request),
    }


def _describe(handle: ServedModel) -> dict[str, Any]:
    described: dict[str, Any] = {"id": handle.id, "status": handle.status.value}
    if handle.status is not ModelStatus.READY:
        described["reason"] = handle.unavailable().message
    if not handle.probed:
        return described
    caps = handle.capabilities
    described.update(
        family=caps.family,
        pipeline=handle.pipeline_class,
        notes=list(caps.notes),
        endpoints=_endpoints(caps),
        extras=sorted(caps.extras),
        sizes={"rule": caps.size.describe(), "default": f"{caps.size.default_width}x{caps.size.default_height}"},
        defaults={"steps": caps.default_steps, "guidance_scale": caps.default_guidance_scale,
                  "strength": caps.default_strength},
    )
    return described


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
