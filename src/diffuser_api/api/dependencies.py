"""Parts built once by ``create_app`` and handed to routes through FastAPI dependencies.

They are ``async`` because FastAPI runs plain functions on its thread pool: four thread hops
per request, each taking the GIL from the model worker, just to read an attribute.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from diffuser_api.config import Settings
from diffuser_api.models.registry import ModelRegistry
from diffuser_api.service.images import ImageService
from diffuser_api.service.storage import ImageStorage


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def _service(request: Request) -> ImageService:
    return request.app.state.service


async def _storage(request: Request) -> ImageStorage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
ServiceDep = Annotated[ImageService, Depends(_service)]
StorageDep = Annotated[ImageStorage, Depends(_storage)]
