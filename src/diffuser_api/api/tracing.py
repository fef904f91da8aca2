"""OpenTelemetry: one server span per HTTP request, its phases (queue wait, denoising, encoding,
storage) as child spans.

Imported only when tracing is on, since OpenTelemetry is an optional extra. The phases ran on
the model worker and the codec pool and were recorded as timestamps (``domain.timeline``); they
become spans with those timestamps when the request ends, so no tracing context crosses threads.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from diffuser_api.api.metrics import route_template
from diffuser_api.api.request_record import RequestRecord, record_of

# The record's fields a span carries, as diffuser.<name>: the key's name, never the key.
RECORD_ATTRIBUTES = ("request_id", "key_name", "model", "task", "size", "steps", "images")
# W3C traceparent from the caller, so a client's trace continues here.
PROPAGATOR = TraceContextTextMapPropagator()


class TracingMiddleware:
    """Pure ASGI, just inside ``RequestIdMiddleware`` (whose record it reads), so it sees every
    answer, refusals by keys and limits included, and a stream's span lasts until it ends."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        method = scope.get("method", "WS")  # a WebSocket session is one span too
        span = self._tracer.start_span(
            method,
            context=PROPAGATOR.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"],
                        "url.scheme": scope.get("scheme", "http")},
        )
        error: BaseException | None = None
        try:
            await self.app(scope, receive, send)
        except BaseException as caught:
            error = caught
            span.record_exception(caught)
            raise
        finally:
            self._finish(span, scope, record_of(HTTPConnection(scope)), error)

    def _finish(self, span: Span, scope: Scope, record: RequestRecord, error: BaseException | None) -> None:
        if "route" in scope:
            route = route_template(scope)
            span.update_name(f"{scope.get('method', 'WS')} {route}")
            span.set_attribute("http.route", route)
        status = record.status if error is None and record.status else 500
        span.set_attribute("http.response.status_code", status)
        for name in RECORD_ATTRIBUTES:
            if (value := getattr(record, name)) is not None:
                span.set_attribute(f"diffuser.{name}", value)
        parent = trace.set_span_in_context(span)
        for phase in record.timeline.phases:
            child = self._tracer.start_span(
                phase.name, context=parent, start_time=phase.start_ns,
                attributes={f"diffuser.{name}": value for name, value in phase.attributes.items()},
            )
            child.end(end_time=phase.end_ns)
        # A refused request is an error too (4xx included), typed by the exception it ended with.
        error_type = type(error).__name__ if error is not None else record.error_type
        if error_type is None and status >= 400:
            error_type = str(status)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR))
        span.end()
