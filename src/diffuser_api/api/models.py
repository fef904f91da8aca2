"""``/v1/models`` in OpenAI's format, read from the registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from diffuser_api.api.dependencies import RegistryDep
from diffuser_api.api.responses import ModelCard, ModelList, error_responses
from diffuser_api.models.registry import ServedModel

router = APIRouter(tags=["models"])


def model_card(handle: ServedModel) -> dict[str, Any]:
    return {"id": handle.id, "object": "model", "created": handle.created, "owned_by": "diffuser-api"}


@router.get(
    "/models", summary="List served models", response_model=None,
    responses={200: {"model": ModelList, "description": "The served models"}} | error_responses(),
)
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(handle) for handle in registry]}


@router.get(
    "/models/{model_id:path}", summary="Describe one served model", response_model=None,
    responses={200: {"model": ModelCard, "description": "The model"}} | error_responses(404),
)
async def get_model(model_id: str, registry: RegistryDep) -> dict[str, Any]:
    return model_card(registry.get(model_id))
