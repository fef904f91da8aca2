"""``create_app``: the one place the HTTP app is assembled from injected parts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from diffuser_api import __version__
from diffuser_api.api import batches, files, health, images, jobs, metrics, models, openai_files, websocket
from diffuser_api.api.auth import ApiKeyMiddleware, PublicPaths
from diffuser_api.api.batch_output import BatchOutput
from diffuser_api.api.body_limits import BodyLimitMiddleware, BodyLimits
from diffuser_api.api.connection_limits import ConnectionLimitMiddleware
from diffuser_api.api.docs import install_docs
from diffuser_api.api.errors import install_error_handlers
from diffuser_api.api.hosts import BrowserSafetyMiddleware, HostAllowList, WebSocketOrigins
from diffuser_api.api.job_webhooks import batch_webhook, job_webhook
from diffuser_api.api.json_requests import batch_body_parser
from diffuser_api.api.keys import load_key_store
from diffuser_api.api.metrics import HttpMetricsMiddleware, ServiceMetrics
from diffuser_api.api.openapi import install_openapi
from diffuser_api.api.playground import install_playground
from diffuser_api.api.proxies import ProxyRule
from diffuser_api.api.rate_limits import RateLimiter, RateLimitMiddleware
from diffuser_api.api.request_id import RequestIdMiddleware
from diffuser_api.api.tracer_provider import tracer_provider_from
from diffuser_api.config import Settings
from diffuser_api.domain.devices import DeviceMemoryProbe
from diffuser_api.jobs.batch_records import BatchStore
from diffuser_api.jobs.batch_service import BatchService
from diffuser_api.jobs.file_records import FileStore
from diffuser_api.jobs.file_service import FileService
from diffuser_api.jobs.records import JobRecord
from diffuser_api.jobs.service import JobService, job_storage
from diffuser_api.models.registry import ModelRegistry
from diffuser_api.service.file_contents import FileContents
from diffuser_api.service.images import ImageService
from diffuser_api.service.storage import ImageStorage, remove_expired_periodically
from diffuser_api.service.webhooks import WebhookSender

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

# Headers browser code may read on a cross-origin response.
EXPOSED_HEADERS = [
    "x-request-id", "retry-after", *(f"x-ratelimit-{part}-{kind}" for kind in ("requests", "images")
                                     for part in ("limit", "remaining", "reset")),
]


def create_app(
    settings: Settings,
    registry: ModelRegistry,
    device_memory: DeviceMemoryProbe | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Models load in the background after start-up, so /health can say 503 meanwhile.

    ``tracer_provider`` traces requests instead of the one ``settings.otel_exporter`` asks for;
    its owner shuts it down, while one built here is shut down (flushed) with the app.
    """
    built_provider = None if tracer_provider is not None else tracer_provider_from(settings)
    tracer_provider = tracer_provider or built_provider
    storage = ImageStorage.from_settings(settings)
    service = ImageService(settings, registry, storage)
    jobs_storage = job_storage(settings)
    webhooks = WebhookSender.from_settings(settings)
    service_metrics = ServiceMetrics(registry, device_memory)
    keys = load_key_store(settings, registry.ids_for)
    proxies = ProxyRule.from_settings(settings)
    rate_limiter = RateLimiter(settings, proxies, on_store_error=service_metrics.rate_limit_store_errors.inc, keys=keys)
    job_service = JobService(settings, registry, service, jobs_storage,
                             on_final=job_webhook(webhooks, jobs_storage, settings) if webhooks else None,
                             charge=rate_limiter.charge_images)
    service_metrics.count_jobs(job_service.counts_by_status)
    job_service.observe(service_metrics.observe_job)
    file_store = FileStore(job_service.database)
    file_service = FileService(settings, file_store, FileContents.from_settings(settings))
    batch_service = BatchService(
        settings, registry, service, BatchStore(job_service.database, file_store), file_service,
        parse_body=batch_body_parser(settings, file_service), render_line=BatchOutput(job_service.storage),
        wake_dispatcher=job_service.wake,
    )

    def batch_line_ended(record: JobRecord) -> None:
        # Only the last of a batch's lines running here asks whether the batch is done; the
        # lines still running say it when they end (a database read after every line cost
        # about as much as recording the line).
        if record.batch_id is not None and not job_service.runs_other_lines(record):
            batch_service.line_finished(record.batch_id)

    job_service.observe(batch_line_ended)
    if webhooks is not None:
        batch_service.observe(batch_webhook(webhooks, batch_service))
    public = PublicPaths(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(registry.start())
        cleanup = asyncio.create_task(remove_expired_periodically(storage, settings.storage_cleanup_interval_s))
        await job_service.start()
        await batch_service.start()
        try:
            yield
        finally:
            cleanup.cancel()
            # Before the models stop: running jobs go back to the queue rather than failing.
            await batch_service.stop()
            await job_service.stop()
            if webhooks is not None:
                await webhooks.close()
            await loading
            await registry.stop(settings.shutdown_grace_s)
            service.close()
            if built_provider is not None:
                built_provider.shutdown()

    app = FastAPI(
        title="Diffuser API",
        version=__version__,
        summary="The OpenAI Images API on Hugging Face diffusers pipelines",
        lifespan=lifespan,
        # /docs is served from the package by install_docs (FastAPI's own page loads from a CDN);
        # there is no /redoc, whose page loads a logo from outside whatever it is told.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.storage = storage
    app.state.service = service
    app.state.jobs = job_service
    app.state.files = file_service
    app.state.batches = batch_service
    app.state.metrics = service_metrics
    app.state.keys = keys
    app.state.proxies = proxies
    app.state.rate_limiter = rate_limiter
    # Listed innermost first: the request id wraps everything (traces read its record), metrics
    # see every answer, unknown hosts and foreign WebSocket origins are refused before anything
    # else answers them, CORS answers preflights before keys are asked for, and limits count
    # only known callers. Body limits wrap every early refusal (busy, key, rate), so each of
    # those drains the unread body too.
    app.add_middleware(RateLimitMiddleware, limiter=app.state.rate_limiter, public=public)
    app.add_middleware(
        ApiKeyMiddleware, keys=keys, public=public, failures=app.state.rate_limiter
    )
    app.add_middleware(ConnectionLimitMiddleware, max_connections=settings.max_connections)
    app.add_middleware(BodyLimitMiddleware, limits=BodyLimits.from_settings(settings))
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
    app.add_middleware(BrowserSafetyMiddleware, hosts=HostAllowList.from_settings(settings),
                       origins=WebSocketOrigins(settings.cors_allow_origins))
    app.add_middleware(HttpMetricsMiddleware, metrics=service_metrics)
    if tracer_provider is not None:
        from diffuser_api.api.tracing import TracingMiddleware  # OpenTelemetry is an optional extra

        app.add_middleware(TracingMiddleware, tracer=tracer_provider.get_tracer("diffuser_api", __version__))
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)
    install_playground(app, settings.api_prefix)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router, prefix=settings.api_prefix)
    app.include_router(files.router, prefix=settings.api_prefix)
    app.include_router(openai_files.router, prefix=settings.api_prefix)
    app.include_router(batches.router, prefix=settings.api_prefix)
    app.include_router(models.router, prefix=settings.api_prefix)
    app.include_router(images.router, prefix=settings.api_prefix)
    app.include_router(websocket.router, prefix=settings.api_prefix)
    return app
