"""Browser safety in process: the Host allow-list and the WebSocket Origin rule.

The same checks against uvicorn with real clients are in tests/integration/test_browser_safety.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from diffuser_api.api.hosts import HostAllowList, WebSocketOrigins, split_host
from diffuser_api.config import Settings
from tests.fakes import fake_app
from tests.unit.test_api import GEN, assert_envelope, wait_ready

WS = "/v1/images/ws"


def allow_list(**settings) -> HostAllowList:
    return HostAllowList.from_settings(Settings(_env_file=None, **settings))


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8000", ("localhost", 8000)),
        ("localhost.:8000", ("localhost", 8000)),
        ("[::1]:8000", ("[::1]", 8000)),
        ("[::1]", ("[::1]", None)),
        ("::1", ("[::1]", None)),
        ("", None),
        ("localhost:http", None),
        ("[::1", None),
        ("[::1]x", None),
    ],
)
def test_host_headers_split_into_name_and_port(header, parsed):
    assert split_host(header) == parsed


@pytest.mark.parametrize("bind", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_server_answers_to_loopback_names_on_any_port(bind):
    hosts = allow_list(host=bind)
    for good in ("localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "LOCALHOST"):
        assert hosts.allows(good), good
    for bad in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "testserver", ""):
        assert not hosts.allows(bad), bad


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "10.1.2.3", "my-pod"])
def test_server_bound_elsewhere_answers_to_any_host(bind):
    hosts = allow_list(host=bind)
    assert hosts.allows("10.1.2.3:8000") and hosts.allows("evil.example") and hosts.allows("")


def test_configured_hosts_replace_the_default():
    hosts = allow_list(host="127.0.0.1", allowed_hosts="images.example,*.corp.example,api.example:8443")
    assert hosts.allows("images.example") and hosts.allows("images.example:9000")
    assert hosts.allows("a.corp.example") and hosts.allows("b.a.corp.example:80")
    assert hosts.allows("api.example:8443")
    assert not hosts.allows("corp.example") and not hosts.allows("evilcorp.example")
    assert not hosts.allows("api.example") and not hosts.allows("api.example:8444")
    assert not hosts.allows("localhost")
    assert allow_list(host="127.0.0.1", allowed_hosts="*").allows("evil.example")
    with pytest.raises(ValueError, match="'images.example:https'"):
        allow_list(allowed_hosts="images.example:https")


def test_websocket_origins():
    origins = WebSocketOrigins(["https://app.example"])
    assert origins.allows(None, "localhost:8000", "ws")  # not a browser
    assert origins.allows("https://APP.example/", "localhost:8000", "ws")
    assert origins.allows("http://localhost:8000", "localhost:8000", "ws")  # same origin
    assert origins.allows("http://images.example", "images.example:80", "ws")  # default ports
    assert origins.allows("https://images.example", "images.example", "wss")
    for origin in ("https://evil.example", "http://localhost:8001", "https://images.example", "null", "garbage"):
        assert not origins.allows(origin, "localhost:8000" if "local" in origin else "images.example", "ws"), origin
    assert WebSocketOrigins(["*"]).allows("https://evil.example", "localhost:8000", "ws")


@pytest.fixture()
def loopback_client(tmp_path):
    """The real default: bound to loopback, no allowed_hosts (fake_app otherwise allows any)."""
    with TestClient(fake_app(tmp_path, allowed_hosts=None), base_url="http://localhost:8000") as client:
        wait_ready(client)
        yield client


def test_unknown_host_is_refused_with_an_envelope(loopback_client):
    for host in ("evil.example", "testserver", "localhost.evil.example:8000"):
        response = loopback_client.get("/v1/models", headers={"host": host})
        error = assert_envelope(response, 400, code="invalid_host")
        assert error["type"] == "invalid_request_error" and "allowed_hosts" in error["message"]
        assert host not in error["message"]  # never echoed back
    assert_envelope(loopback_client.post(GEN, json={"prompt": "x"}, headers={"host": "evil.example"}), 400,
                    code="invalid_host")
    # Probes address a pod by its IP: /health answers whatever the Host.
    assert loopback_client.get("/health", headers={"host": "10.0.0.7:8000"}).json() == {"status": "ok"}
    assert loopback_client.get("/v1/models").status_code == 200
    assert loopback_client.post(GEN, json={"prompt": "x"}, headers={"host": "127.0.0.1:8000"}).status_code == 200


def test_foreign_websocket_origin_is_refused_before_accepting(tmp_path):
    app = fake_app(tmp_path, cors_allow_origins=["https://app.example"])
    with TestClient(app) as client:
        wait_ready(client)
        for origin in ("https://evil.example", "null"):
            with pytest.raises(WebSocketDenialResponse) as caught, client.websocket_connect(
                WS, headers={"origin": origin}
            ):
                pass
            denial = caught.value
            assert denial.status_code == 403
            error = denial.json()["error"]
            assert error["code"] == "origin_not_allowed" and error["type"] == "invalid_request_error"
            assert error["request_id"] == denial.headers["x-request-id"] and error["message"]
        for headers in ({}, {"origin": "https://app.example"}, {"origin": "http://testserver"}):
            with client.websocket_connect(WS, headers=headers) as socket:
                socket.send_json({"prompt": "x", "size": "32x32", "num_inference_steps": 2})
                while (message := socket.receive_json())["type"] != "done":
                    assert message["type"] != "error", message
