"""API keys: the official SDK's view (401 / 200), public paths, key files, WebSockets, CORS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import openai
import pytest
import yaml
from fastapi import WebSocket
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.testclient import WebSocketDenialResponse

from diffuser_api.api.auth import KEY_SUBPROTOCOL_PREFIX, ApiKeyMiddleware, PublicPaths, accepted_subprotocol
from diffuser_api.api.keys import ApiKey, KeyStore, hash_key, load_key_store
from diffuser_api.api.proxies import ProxyRule
from diffuser_api.api.rate_limits import RateLimiter
from diffuser_api.config import Settings
from tests.fakes import fake_app
from tests.unit.test_api import GEN, assert_envelope, assert_still_serves, wait_ready

GOOD = "sk-good-0123456789"
ALICE = "sk-alice-secret-key"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def sdk(client: TestClient, key: str, **options) -> openai.OpenAI:
    """The official SDK, talking to the in-process app through the test client."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, **options)


@pytest.fixture()
def client(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"name": "alice", "key_sha256": sha(ALICE)}]}))
    with TestClient(fake_app(tmp_path, api_keys=[GOOD], api_keys_file=keys_file)) as test_client:
        wait_ready(test_client)
        yield test_client


def test_sdk_with_a_wrong_key_gets_401_and_the_right_key_works(client):
    # The SDK refuses to send no key at all; that case is the raw-HTTP test below.
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(client, "sk-wrong", max_retries=0).images.generate(prompt="x", size="32x32")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key" and caught.value.type == "invalid_request_error"
    for key in (GOOD, ALICE):
        result = sdk(client, key).images.generate(prompt="a fox", size="32x32")
        assert result.data[0].b64_json


def test_401_envelope_for_missing_wrong_and_malformed_headers(client):
    for headers in ({}, bearer("sk-wrong"), {"authorization": GOOD}, {"authorization": f"Basic {GOOD}"}):
        response = client.post(GEN, json={"prompt": "x"}, headers=headers)
        assert_envelope(response, 401, code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert GOOD not in response.text
    # Refused before the body is read: a broken body without a key is still a 401, not a 400.
    assert_envelope(client.post(GEN, content=b"{not json", headers={"content-type": "application/json"}), 401)
    assert_envelope(client.get("/v1/no-such-route"), 401)


def test_public_paths_need_no_key_and_the_rest_do(client):
    assert client.get("/health").status_code == 200
    for path in ("/", "/v1/models", "/metrics", "/docs"):
        assert_envelope(client.get(path), 401)
        assert client.get(path, headers=bearer(GOOD)).status_code == 200
    response = client.post(GEN, json={"prompt": "x", "response_format": "url"}, headers=bearer(GOOD))
    url = response.json()["data"][0]["url"]
    assert client.get(url).status_code == 200  # no key: names are unguessable
    # Traversal attempts on the public file route are plain 404s.
    for bad in ("..%2F..%2Fetc%2Fpasswd", "..%2Fkeys.yaml", "%2Fetc%2Fpasswd", "1800000000-" + "A" * 32 + ".png"):
        assert_envelope(client.get(f"/v1/images/files/{bad}"), 404)


def test_metrics_can_be_public(tmp_path):
    with TestClient(fake_app(tmp_path, api_keys=[GOOD], metrics_public=True)) as client:
        wait_ready(client)
        assert client.get("/metrics").status_code == 200
        assert_envelope(client.get("/v1/models"), 401)


def test_service_info_shows_the_key_name_never_the_key(client):
    info = client.get("/", headers=bearer(ALICE)).json()
    assert info["caller"] == {"api_key": "alice", "rate_limits": {"requests": None, "images": None}}
    plain = client.get("/", headers=bearer(GOOD)).json()["caller"]["api_key"]
    assert plain == f"key-{sha(GOOD)[:8]}"
    assert ALICE not in json.dumps(info)


def test_logs_name_the_key_and_never_contain_it(client, caplog):
    caplog.set_level(logging.DEBUG)
    client.post(GEN, json={"prompt": "x"}, headers=bearer(ALICE))
    client.post(GEN, json={"prompt": "x"}, headers=bearer("sk-wrong-secret"))
    lines = [record.getMessage() for record in caplog.records]
    assert any("key=alice" in line for line in lines)
    assert not any(ALICE in line or "sk-wrong-secret" in line for line in lines)


def test_json_keys_file_with_limits(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"name": "bob", "key_sha256": sha("sk-bob"), "limits": {"requests": 30}}]))
    with TestClient(fake_app(tmp_path, api_keys_file=keys_file)) as client:
        wait_ready(client)
        assert_envelope(client.get("/v1/models", headers=bearer(GOOD)), 401)
        caller = client.get("/", headers=bearer("sk-bob")).json()["caller"]
        assert caller == {"api_key": "bob", "rate_limits": {"requests": "30/minute", "images": None}}


@pytest.mark.parametrize(
    "entries",
    [
        [{"name": "a", "key_sha256": "not-a-hash"}],
        [{"name": "a", "key": "sk-plain-text"}],
        [{"name": "a", "key_sha256": sha("x"), "limits": {"requests": "lots"}}],
        [{"name": "a", "key_sha256": sha("x")}, {"name": "a", "key_sha256": sha("y")}],
    ],
)
def test_bad_keys_files_stop_the_start(tmp_path, entries):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(entries))
    with pytest.raises((ValidationError, ValueError)):
        fake_app(tmp_path, api_keys_file=keys_file)


def test_key_lookup_matches_only_the_exact_key():
    store = KeyStore([])
    assert not store.enabled and store.find("anything") is None
    store = KeyStore([ApiKey("a", hash_key("sk-a")), ApiKey("b", hash_key("sk-b"))])
    assert store.find("sk-b").name == "b"
    assert store.find("sk-a ") is None and store.find("sk-") is None and store.find("") is None


def test_cors_preflight_needs_no_key_and_exposes_rate_limit_headers(tmp_path):
    app = fake_app(tmp_path, api_keys=[GOOD], cors_allow_origins=["https://app.example"], rate_limit_requests=10)
    with TestClient(app) as client:
        wait_ready(client)
        preflight = client.options(GEN, headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        })
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = client.post(GEN, json={"prompt": "x"}, headers={**bearer(GOOD), "origin": "https://app.example"})
        exposed = response.headers["access-control-expose-headers"]
        assert "x-ratelimit-remaining-requests" in exposed and "x-request-id" in exposed
        other = client.get("/health", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def websocket_app(tmp_path, **settings):
    """The server has no WebSocket route yet: this test-only one shows any route is guarded."""
    app = fake_app(tmp_path, api_keys=[GOOD], **settings)

    @app.websocket("/v1/test-socket")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol=accepted_subprotocol(websocket.scope))
        await websocket.send_json({"key": websocket.state.api_key.name})
        await websocket.close()

    return app


def test_websocket_takes_the_key_as_header_query_or_subprotocol(tmp_path):
    with TestClient(websocket_app(tmp_path)) as client:
        with client.websocket_connect("/v1/test-socket", headers=bearer(GOOD)) as socket:
            assert socket.receive_json() == {"key": f"key-{sha(GOOD)[:8]}"}
        with client.websocket_connect(f"/v1/test-socket?api_key={GOOD}") as socket:
            assert socket.receive_json()["key"].startswith("key-")
        offered = ["images.v1", KEY_SUBPROTOCOL_PREFIX + GOOD]
        with client.websocket_connect("/v1/test-socket", subprotocols=offered) as socket:
            assert socket.accepted_subprotocol == "images.v1"  # never the key
            assert socket.receive_json()["key"].startswith("key-")
        for kwargs in ({}, {"headers": bearer("sk-wrong")}, {"subprotocols": [KEY_SUBPROTOCOL_PREFIX + "sk-wrong"]}):
            denied = pytest.raises(WebSocketDenialResponse)
            with denied as caught, client.websocket_connect("/v1/test-socket", **kwargs):
                pass
            assert caught.value.status_code == 401
            assert caught.value.json()["error"]["code"] == "invalid_api_key"


def test_websocket_without_denial_responses_is_closed_with_1008():
    """Servers without the websocket.http.response extension get a policy-violation close."""
    sent: list[dict] = []

    async def route(scope, receive, send):
        raise AssertionError("the route must not run")

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    settings = Settings(_env_file=None)
    failures = RateLimiter(settings, ProxyRule([]), on_store_error=lambda: None)
    middleware = ApiKeyMiddleware(route, KeyStore([ApiKey("a", hash_key(GOOD))]), PublicPaths(settings), failures)
    scope = {"type": "websocket", "path": "/v1/socket", "headers": [], "query_string": b"api_key=sk-bad",
             "subprotocols": [], "state": {}}
    asyncio.run(middleware(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "invalid_api_key"}]


def test_failed_key_checks_are_limited_per_client_address(tmp_path):
    app = fake_app(tmp_path, api_keys=[GOOD], rate_limit_auth_failures="3/minute")
    with TestClient(app, client=("198.51.100.1", 50000)) as guesser:
        wait_ready(guesser)
        for _ in range(5):  # right keys do not count
            assert guesser.get("/v1/models", headers=bearer(GOOD)).status_code == 200
        for guess in ("sk-guess-1", "sk-guess-2", "sk-guess-3"):
            assert_envelope(guesser.get("/v1/models", headers=bearer(guess)), 401, code="invalid_api_key")
        # Then every attempt is refused until the window frees up, even the right key: a 200
        # would tell the guesser which guess was right.
        for headers in (bearer("sk-guess-4"), bearer(GOOD), {}):
            response = guesser.post(GEN, json={"prompt": "x"}, headers=headers)
            error = assert_envelope(response, 429, code="rate_limit_exceeded")
            assert "failed API key checks" in error["message"] and GOOD not in response.text
            assert 55 <= int(response.headers["retry-after"]) <= 60
        # Other addresses are not affected, and have their own count.
        neighbour = TestClient(app, client=("198.51.100.2", 50000), headers=bearer(GOOD))
        assert_still_serves(neighbour)
        assert_envelope(neighbour.get("/v1/models", headers=bearer("sk-wrong")), 401)
        assert neighbour.get("/v1/models").status_code == 200


def test_failed_key_checks_count_the_client_behind_a_trusted_proxy(tmp_path):
    app = fake_app(tmp_path, api_keys=[GOOD], rate_limit_auth_failures="1/minute", trusted_proxies=["10.0.0.0/8"])
    with TestClient(app, client=("10.0.0.5", 50000)) as proxy:
        wait_ready(proxy)
        first, second = ({"x-forwarded-for": f"203.0.113.{i}"} for i in (1, 2))
        assert_envelope(proxy.get("/v1/models", headers={**first, **bearer("sk-wrong")}), 401)
        assert_envelope(proxy.get("/v1/models", headers={**first, **bearer(GOOD)}), 429)
        # A made-up address left of the proxy's entry does not reset the count.
        spoofed = {"x-forwarded-for": "6.6.6.6, 203.0.113.1", **bearer(GOOD)}
        assert_envelope(proxy.get("/v1/models", headers=spoofed), 429)
        assert proxy.get("/v1/models", headers={**second, **bearer(GOOD)}).status_code == 200


def test_keys_from_the_environment_are_secret_in_settings(monkeypatch):
    monkeypatch.setenv("DIFFUSER_API_KEYS", " sk-env-a , sk-env-b ")
    settings = Settings(_env_file=None)
    assert "sk-env-a" not in repr(settings) and "sk-env-a" not in str(settings.model_dump())
    store = load_key_store(settings, frozenset)  # no keys file: no model names to resolve
    assert store.find("sk-env-a").name == f"key-{sha('sk-env-a')[:8]}"
    assert store.find("sk-env-b") is not None and store.find("sk-env-a , sk-env-b") is None
