"""The tracer provider ``DIFFUSER_OTEL_EXPORTER`` asks for, or none.

OpenTelemetry's SDK is an optional extra: it is imported only here, and only when tracing is
on. The provider is handed to the app rather than set as OpenTelemetry's global one, so several
apps in one process (tests, Ray Serve replicas) each trace on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffuser_api import __version__
from diffuser_api.config import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def tracer_provider_from(settings: Settings) -> TracerProvider | None:
    """Console spans are written as they end; OTLP spans are sent in batches off the loop."""
    if settings.otel_exporter == "none":
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

        if settings.otel_exporter == "otlp":
            # Reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT itself.
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        raise RuntimeError(
            f"DIFFUSER_OTEL_EXPORTER={settings.otel_exporter} needs OpenTelemetry: "
            f"pip install 'diffuser-api[otel]' ({error})"
        ) from error
    resource = Resource.create({"service.name": settings.otel_service_name, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    if settings.otel_exporter == "otlp":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return provider
