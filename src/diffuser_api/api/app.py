"""``create_app``: the one place the HTTP app is assembled from injected parts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from diffuser_api import __version__
from diffuser_api.api import health, images, models, websocket
from diffuser_api.api.errors import install_error_handlers
from diffuser_api.api.request_id import RequestIdMiddleware
from diffuser_api.config import Settings
from diffuser_api.models.registry import ModelRegistry
from diffuser_api.service.images import ImageService
from diffuser_api.service.storage import LocalStorage


def create_app(settings: Settings, registry: ModelRegistry) -> FastAPI:
    """Models load in the background after start-up, so /health can say 503 meanwhile."""
    storage = LocalStorage(settings.storage_dir)
    service = ImageService(settings, registry, storage)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(registry.load_all())
        try:
            yield
        finally:
            await loading
            await registry.stop(settings.shutdown_grace_s)
            service.close()

    app = FastAPI(
        title="Diffuser API",
        version=__version__,
        summary="The OpenAI Images API on Hugging Face diffusers pipelines",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.storage = storage
    app.state.service = service
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router, prefix=settings.api_prefix)
    app.include_router(images.router, prefix=settings.api_prefix)
    app.include_router(websocket.router, prefix=settings.api_prefix)
    return app
