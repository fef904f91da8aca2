"""``/health`` for orchestrators and ``/`` for people: what is served and what it can do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from diffuser_api import __version__
from diffuser_api.api.dependencies import AllowedModelsDep, RegistryDep, SettingsDep
from diffuser_api.api.models import describe_model
from diffuser_api.api.rate_limits import describe_limits
from diffuser_api.api.responses import HealthResponse, ServiceInfo, error_responses
from diffuser_api.models.registry import ModelStatus

router = APIRouter(tags=["service"])


@router.get(
    "/health", summary="200 once the pinned (or default) models are ready; with ?model=ID, that model",
    response_model=None,
    responses={200: {"model": HealthResponse, "description": "Ready"}} | error_responses(404),
)
async def health(
    registry: RegistryDep,
    allowed: AllowedModelsDep,
    model: str | None = Query(None, description="A served model's id: 200 ready, 503 not ready (yet), 404 unknown. "
                                                "Needs a key when keys are on."),
) -> dict[str, str]:
    """Public without ``model`` (no key), so it says only ready or why not in our own words:
    never paths or the loader's exception, which the server's log has. A model that is not
    loaded (``unloaded``, ``offloaded``) is not ready: a request would have to wait for a load."""
    if model is None:
        if (problem := registry.health_problem()) is not None:
            raise problem
        return {"status": "ok"}
    served = registry.get(model, allowed)
    if served.status is not ModelStatus.READY:
        raise served.unavailable()
    return {"status": "ok"}


@router.get(
    "/", summary="Service information: models and what each endpoint can do", response_model=None,
    responses={200: {"model": ServiceInfo, "description": "What is served and how"}} | error_responses(),
)
async def service_info(
    registry: RegistryDep, settings: SettingsDep, allowed: AllowedModelsDep, request: Request
) -> dict[str, Any]:
    return {
        "service": "diffuser-api",
        "version": __version__,
        "api_prefix": settings.api_prefix,
        "docs": "/docs",
        "models": [describe_model(model) for model in registry if allowed is None or model.id in allowed],
        "caller": describe_limits(request),
    }
