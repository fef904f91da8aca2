"""OpenTelemetry traces: one server span per request, its phases as children, errors marked;
nothing of OpenTelemetry's SDK loaded when tracing is off."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.fakes import FakeRunner, fake_app
from tests.unit.test_api import GEN, wait_ready
from tests.unit.test_auth import bearer
from tests.unit.test_streaming import sse_events

KEY = "sk-trace-test"
REPOSITORY = Path(__file__).parents[2]


@pytest.fixture()
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture()
def client(tmp_path, exporter) -> Iterator[TestClient]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner = FakeRunner(fail_on={"boom": RuntimeError("fake pipeline exploded")})
    with TestClient(fake_app(tmp_path, runner, tracer_provider=provider, api_keys=[KEY])) as test_client:
        wait_ready(test_client)
        exporter.clear()
        yield test_client


def request_span(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, dict[str, list[ReadableSpan]]]:
    """The one server span, and its children by name (checked to be its children)."""
    spans = exporter.get_finished_spans()
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    children: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if span is not server:
            assert span.parent is not None and span.parent.span_id == server.context.span_id
            assert span.context.trace_id == server.context.trace_id
            assert server.start_time <= span.start_time <= span.end_time <= server.end_time
            children.setdefault(span.name, []).append(span)
    return server, children


def test_generation_span_has_queue_wait_denoising_encoding_and_storage(client, exporter):
    payload = {"prompt": "fox", "n": 2, "size": "32x16", "num_inference_steps": 3, "seed": 7,
               "response_format": "url"}
    response = client.post(GEN, json=payload, headers={**bearer(KEY), "x-request-id": "trace-1"})
    assert response.status_code == 200
    server, children = request_span(exporter)
    assert server.name == "POST /v1/images/generations" and server.status.status_code is StatusCode.UNSET
    attributes = dict(server.attributes)
    assert attributes["http.route"] == GEN and attributes["http.response.status_code"] == 200
    assert attributes["diffuser.request_id"] == "trace-1" and attributes["diffuser.key_name"].startswith("key-")
    assert (attributes["diffuser.model"], attributes["diffuser.task"], attributes["diffuser.images"]) == (
        "fake-model", "generations", 2)
    assert (attributes["diffuser.size"], attributes["diffuser.steps"]) == ("32x16", 3)
    assert sorted((name, len(spans)) for name, spans in children.items()) == [
        ("denoising", 1), ("encoding", 2), ("queue wait", 1), ("storage", 2)]
    (queued,), (denoising,) = children["queue wait"], children["denoising"]
    assert queued.end_time == denoising.start_time < denoising.end_time
    encoded = {span.attributes["diffuser.seed"]: span for span in children["encoding"]}
    stored = {span.attributes["diffuser.seed"]: span for span in children["storage"]}
    assert set(encoded) == set(stored) == {7, 8}
    for seed, encoding in encoded.items():
        assert denoising.end_time <= encoding.start_time < encoding.end_time <= stored[seed].start_time
        assert encoding.attributes["diffuser.output_format"] == "png" and stored[seed].attributes["diffuser.bytes"] > 0
    every_value = [str(value) for span in exporter.get_finished_spans() for value in span.attributes.values()]
    assert not any(KEY in value for value in every_value)


def test_b64_answers_are_encoded_but_not_stored(client, exporter):
    assert client.post(GEN, json={"prompt": "fox"}, headers=bearer(KEY)).status_code == 200
    _, children = request_span(exporter)
    assert sorted(children) == ["denoising", "encoding", "queue wait"]


@pytest.mark.parametrize(
    ("payload", "headers", "status", "error_type"),
    [
        ({"prompt": "fox", "size": "13x7"}, bearer(KEY), 400, "InvalidRequest"),
        ({"prompt": "fox"}, {}, 401, "Unauthorized"),
        ({"prompt": "boom"}, bearer(KEY), 500, "ModelFailure"),
    ],
)
def test_a_failed_request_is_an_error_span_with_its_type(client, exporter, payload, headers, status, error_type):
    assert client.post(GEN, json=payload, headers=headers).status_code == status
    server, children = request_span(exporter)
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == error_type and server.attributes["http.response.status_code"] == status
    assert ("denoising" in children) == (status == 500)  # refusals never reach the model


def test_a_bug_of_ours_is_an_error_span_with_the_exception(client, exporter, monkeypatch):
    async def broken(*args: object, **kwargs: object) -> None:
        raise LookupError("a bug")

    monkeypatch.setattr(client.app.state.service, "create", broken)
    with pytest.raises(LookupError):  # the test client re-raises what the 500 handler answered
        client.post(GEN, json={"prompt": "fox"}, headers=bearer(KEY))
    server, _ = request_span(exporter)
    assert server.status.status_code is StatusCode.ERROR and server.attributes["error.type"] == "LookupError"
    assert server.attributes["http.response.status_code"] == 500
    assert [event.name for event in server.events] == ["exception"]


def test_a_streamed_request_span_lasts_until_the_stream_ends(client, exporter):
    payload = {"prompt": "fox", "stream": True, "partial_images": 2, "num_inference_steps": 6}
    with client.stream("POST", GEN, json=payload, headers=bearer(KEY)) as response:
        types = [body["type"] for _, body in sse_events(response)]
    assert types[-1] == "image_generation.completed"
    server, children = request_span(exporter)
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes["diffuser.steps"] == 6
    previews = [span for span in children["encoding"] if span.attributes.get("diffuser.preview")]
    (final,) = [span for span in children["encoding"] if not span.attributes.get("diffuser.preview")]
    assert len(previews) == 2 and "storage" not in children
    (denoising,) = children["denoising"]
    # The final image is encoded after the handler returned: the span waited for the stream.
    assert denoising.end_time <= final.start_time and final.end_time <= server.end_time


def test_a_stream_that_fails_after_its_200_is_an_error_span(client, exporter):
    with client.stream("POST", GEN, json={"prompt": "boom", "stream": True}, headers=bearer(KEY)) as response:
        assert response.status_code == 200
        assert [name for name, _ in sse_events(response)] == ["error"]
    server, _ = request_span(exporter)
    assert server.status.status_code is StatusCode.ERROR and server.attributes["error.type"] == "ModelFailure"


def test_a_callers_traceparent_continues_its_trace(client, exporter):
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = {**bearer(KEY), "traceparent": f"00-{trace_id}-{parent_id}-01"}
    client.post(GEN, json={"prompt": "fox"}, headers=headers)
    server, _ = request_span(exporter)
    assert server.context.trace_id == int(trace_id, 16) and server.parent.span_id == int(parent_id, 16)


def test_otlp_exporter_sends_to_the_standard_endpoint(tmp_path, monkeypatch):
    """A real OTLP/HTTP round trip: the collector is a local HTTP server; shutting the app down
    flushes the batch."""
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the handler's API)
            received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}")
    try:
        app = fake_app(tmp_path, otel_exporter="otlp", otel_service_name="images-under-test")
        with TestClient(app) as test_client:
            wait_ready(test_client)
            assert test_client.post(GEN, json={"prompt": "fox"}).status_code == 200
    finally:
        collector.shutdown()
    assert received and {path for path, _ in received} == {"/v1/traces"}
    names, services = set(), set()
    for _, body in received:
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            names |= {span.name for scope in resource_spans.scope_spans for span in scope.spans}
    assert services == {"images-under-test"}
    assert {"POST /v1/images/generations", "queue wait", "denoising", "encoding"} <= names


def test_a_missing_extra_is_a_start_up_error_naming_it(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'diffuser-api\[otel\]'"):
        fake_app(tmp_path, otel_exporter="console")


PROBE = """
import sys, tempfile
from pathlib import Path
from fastapi.testclient import TestClient
from tests.fakes import fake_app
from tests.unit.test_api import GEN, wait_ready

with TestClient(fake_app(Path(tempfile.mkdtemp()), otel_exporter=sys.argv[1])) as client:
    wait_ready(client)
    assert client.post(GEN, json={"prompt": "fox"}).status_code == 200
tracing = ("opentelemetry.sdk", "opentelemetry.exporter", "diffuser_api.api.tracing")
print("LOADED", sorted(name for name in sys.modules if name.startswith(tracing)))
"""


def run_probe(exporter_setting: str) -> str:
    """A fresh interpreter, since this one has the SDK loaded by the tests above."""
    result = subprocess.run([sys.executable, "-c", PROBE, exporter_setting], capture_output=True, text=True,
                            timeout=120, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tracing_off_loads_no_opentelemetry_sdk_or_tracing_code():
    """FastAPI itself imports OpenTelemetry's API (0.165 on); the SDK and exporters stay out."""
    assert run_probe("none").splitlines()[-1] == "LOADED []"


def test_console_exporter_prints_the_spans():
    output = run_probe("console")
    assert '"name": "POST /v1/images/generations"' in output and '"name": "denoising"' in output


def test_a_websocket_session_is_one_span_with_its_phases(client, exporter):
    with client.websocket_connect(f"/v1/images/ws?api_key={KEY}") as socket:
        socket.send_json({"prompt": "fox", "size": "32x16", "num_inference_steps": 3, "partial_images": 1})
        while socket.receive_json()["type"] != "done":
            pass
    server, children = request_span(exporter)
    assert server.name == "WS /v1/images/ws"
    attributes = dict(server.attributes)
    assert (attributes["diffuser.task"], attributes["diffuser.size"], attributes["diffuser.steps"]) == (
        "generations", "32x16", 3)
    assert {"queue wait", "denoising", "encoding"} <= set(children)
    assert len(children["encoding"]) == 2  # the preview and the final image
