"""Parts built once by ``create_app`` and handed to routes through FastAPI dependencies.

They are ``async`` because FastAPI runs plain functions on its thread pool: four thread hops
per request, each taking the GIL from the model worker, just to read an attribute.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from diffuser_api.api.auth import api_key_of
from diffuser_api.api.keys import KeyStore
from diffuser_api.config import Settings
from diffuser_api.errors import Forbidden
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


def allowed_models(connection: HTTPConnection) -> frozenset[str] | None:
    """The model ids the caller's key may use; None: every model (keys off, or a key without a
    ``models`` list). HTTP routes take it as ``AllowedModelsDep``, the WebSocket calls it."""
    key = api_key_of(connection)
    return None if key is None else key.models


async def _allowed_models(request: Request) -> frozenset[str] | None:
    return allowed_models(request)


async def _require_admin(request: Request) -> None:
    """Loading and unloading change what every caller gets, so they need a key with
    ``role: admin``; with no keys at all, only a server started with ``admin_open``."""
    keys: KeyStore = request.app.state.keys
    if keys.enabled:
        key = api_key_of(request)  # the key middleware refused a request without one (401)
        if key is None or not key.admin:
            raise Forbidden("Loading and unloading models needs an API key with role 'admin'.",
                            code="admin_required")
    elif not request.app.state.settings.admin_open:
        raise Forbidden("Loading and unloading models is off on this server: configure an admin key "
                        "(role: admin in the keys file) or set DIFFUSER_ADMIN_OPEN=true.", code="admin_required")


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
ServiceDep = Annotated[ImageService, Depends(_service)]
StorageDep = Annotated[ImageStorage, Depends(_storage)]
AllowedModelsDep = Annotated[frozenset[str] | None, Depends(_allowed_models)]
AdminDep = Depends(_require_admin)
