"""Body caps per route, the body timeout and max_connections: the envelopes they answer with.

The same limits on real sockets (discarding, closing, slow clients, memory) are in
tests/integration/test_request_limits.py.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from tests.fakes import fake_app, png_bytes
from tests.unit.test_api import EDIT, GEN, VAR, assert_envelope, assert_still_serves, wait_ready

KIB = 1024


def data_url_edit(size: int) -> dict:
    """An edits JSON body of about ``size`` bytes: a real PNG with padding after its end."""
    image = png_bytes() + b"\0" * size
    return {"prompt": "x", "images": [{"image_url": "data:image/png;base64," + base64.b64encode(image).decode()}]}


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path, max_json_bytes=4 * KIB, max_edit_bytes=64 * KIB)) as test_client:
        wait_ready(test_client)
        yield test_client


def test_json_body_over_the_small_routes_cap_is_413(client):
    response = client.post(GEN, json={"prompt": "x" * 5 * KIB})
    error = assert_envelope(response, 413, code="payload_too_large")
    assert error["param"] is None and error["type"] == "invalid_request_error"
    assert "4096 bytes" in error["message"] and "/v1/images/generations" in error["message"]
    assert response.headers["connection"] == "close"
    assert response.headers["x-should-retry"] == "false"
    assert_still_serves(client)


def test_chunked_body_is_refused_once_it_passes_the_cap(client):
    chunks = iter([b'{"prompt": "', *[b"x" * KIB] * 8, b'"}'])
    response = client.post(GEN, content=chunks, headers={"content-type": "application/json"})
    assert_envelope(response, 413, code="payload_too_large")
    assert_still_serves(client)


def test_edits_have_their_own_larger_cap(client):
    assert client.post(EDIT, json=data_url_edit(10 * KIB)).status_code == 200  # over the JSON cap, fine here
    response = client.post(EDIT, json=data_url_edit(70 * KIB))
    error = assert_envelope(response, 413, code="payload_too_large")
    assert "65536 bytes" in error["message"]
    assert_still_serves(client)


def test_multipart_over_the_edit_cap_is_413_even_below_the_part_cap(client):
    parts = [("image[]", (None, png_bytes() + b"\0" * 20 * KIB, "image/png"))] * 4
    for path in (EDIT, VAR):
        response = client.post(path, data={"prompt": "x"} if path == EDIT else {}, files=parts)
        error = assert_envelope(response, 413, code="payload_too_large")
        assert path in error["message"]
    assert_still_serves(client)


def test_image_url_is_bounded_only_by_the_body_cap(tmp_path):
    """No schema limit of its own: a 30 MB data URL passes when the edit cap allows it."""
    with TestClient(fake_app(tmp_path, max_upload_bytes=64 * KIB * KIB)) as client:
        wait_ready(client)
        assert client.post(EDIT, json=data_url_edit(22 * KIB * KIB)).status_code == 200


def test_over_max_connections_is_503_with_retry_after_but_health_answers(tmp_path):
    with TestClient(fake_app(tmp_path, max_connections=0)) as client:
        assert client.get("/health").status_code in (200, 503)  # exempt: ready or loading, never busy
        assert client.get("/metrics").status_code == 200
        response = client.post(GEN, json={"prompt": "x"})
        error = assert_envelope(response, 503, code="server_busy")
        assert error["type"] == "server_error"
        assert response.headers["retry-after"] == "1"
        with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/v1/images/ws"):
            pass
        assert denied.value.status_code == 503
        assert denied.value.json()["error"]["code"] == "server_busy"


def test_stalled_body_is_408_and_the_app_never_sees_the_rest(tmp_path):
    """At the ASGI level, so the stall is exact: one chunk, then nothing."""
    app = fake_app(tmp_path, body_timeout_s=0.05)
    sent: list[dict] = []
    body = json.dumps({"prompt": "stalled"}).encode()
    chunks = [{"type": "http.request", "body": body[:5], "more_body": True}]

    async def receive() -> dict:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": GEN, "raw_path": GEN.encode(), "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("127.0.0.1", 1),
        "root_path": "", "state": {}, "app": app,
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    start = next(message for message in sent if message["type"] == "http.response.start")
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    envelope = json.loads(b"".join(message.get("body", b"") for message in sent[1:]))
    error = envelope["error"]
    assert error["code"] == "body_timeout" and error["type"] == "invalid_request_error"
    assert error["request_id"] and error["message"] and "param" in error
    assert [message["type"] for message in sent].count("http.response.start") == 1  # the app's own answer dropped
