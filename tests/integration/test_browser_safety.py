"""Browser safety on a real uvicorn with real clients: the Host allow-list (DNS rebinding) and
the WebSocket Origin rule, answered during uvicorn's own handshake."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.fakes import fake_app
from tests.servers import ThreadedServer
from tests.unit.test_api import assert_envelope

pytestmark = pytest.mark.slow

APP_ORIGIN = "https://app.example"


@pytest.fixture()
def server(tmp_path) -> Iterator[ThreadedServer]:
    """The defaults a local server runs with: bound to loopback, no allowed_hosts."""
    with ThreadedServer(fake_app(tmp_path, allowed_hosts=None, cors_allow_origins=[APP_ORIGIN])) as running:
        running.wait_ready()
        yield running


def socket_url(server: ThreadedServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/v1/images/ws"


def generate_over_socket(server: ThreadedServer, origin: str | None) -> list[str]:
    with connect(socket_url(server), origin=origin, open_timeout=10) as websocket:
        websocket.send(json.dumps({"prompt": "a fox", "size": "32x32", "num_inference_steps": 2}))
        types = []
        while not types or types[-1] not in ("done", "error"):
            types.append(json.loads(websocket.recv(timeout=10))["type"])
        return types


def test_websocket_origins_on_a_real_server(server):
    for origin in (None, APP_ORIGIN, server.base_url):  # no browser, a CORS origin, the same origin
        assert generate_over_socket(server, origin)[-2:] == ["completed", "done"], origin
    for origin in ("https://evil.example", "http://localhost:1"):
        with pytest.raises(InvalidStatus) as caught:
            generate_over_socket(server, origin)
        response = caught.value.response
        assert response.status_code == 403
        error = json.loads(response.body)["error"]
        assert error["code"] == "origin_not_allowed" and error["type"] == "invalid_request_error"
        assert error["message"] and error["request_id"] == response.headers["x-request-id"]
    assert generate_over_socket(server, None)[-1] == "done"


def test_rebound_host_is_refused_on_a_real_server(server):
    """What a page on evil.example sends once its name points at 127.0.0.1."""
    port = int(server.base_url.rsplit(":", 1)[1])
    payload = {"prompt": "x", "size": "32x32"}
    for host in ("evil.example", f"evil.example:{port}"):
        response = httpx.post(f"{server.base_url}/v1/images/generations", json=payload, headers={"host": host})
        assert_envelope(response, 400, code="invalid_host")
    with socket.create_connection(("127.0.0.1", port)) as rebound, pytest.raises(InvalidStatus) as caught:
        connect(f"ws://evil.example:{port}/v1/images/ws", sock=rebound, origin=f"http://evil.example:{port}")
    assert caught.value.response.status_code == 400
    assert json.loads(caught.value.response.body)["error"]["code"] == "invalid_host"
    assert httpx.post(f"{server.base_url}/v1/images/generations", json=payload).status_code == 200
    assert httpx.post(f"http://localhost:{port}/v1/images/generations", json=payload).status_code == 200
