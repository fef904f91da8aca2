"""One proxy rule for the whole app: forwarded headers count only from trusted proxies, and the
client is the right-most forwarded address that is not one. Spoofing is tried through the
server exactly as the CLI starts it (uvicorn with its own proxy handling off)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import HTTPConnection

from diffuser_api.api.proxies import ProxyRule
from diffuser_api.cli import uvicorn_config
from tests.fakes import fake_app
from tests.servers import ThreadedServer
from tests.unit.test_api import GEN, assert_envelope, wait_ready


def connection(peer: str, forwarded: list[str] = (), **headers: str) -> HTTPConnection:
    raw = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    raw += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return HTTPConnection({"type": "http", "client": (peer, 40000), "headers": raw})


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "client"),
    [
        ([], "127.0.0.1", ["203.0.113.7"], "127.0.0.1"),  # nobody trusted: headers are ignored
        (["10.0.0.0/8"], "198.51.100.1", ["203.0.113.7"], "198.51.100.1"),  # peer not a proxy
        (["10.0.0.0/8"], "10.0.0.5", [], "10.0.0.5"),  # a proxy that forwards nothing
        (["10.0.0.0/8"], "10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
        # Addresses the client wrote itself land left of the one the proxy appended.
        (["10.0.0.0/8"], "10.0.0.5", ["6.6.6.6, 203.0.113.7"], "203.0.113.7"),
        (["10.0.0.0/8"], "10.0.0.5", ["6.6.6.6, 203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # two proxies
        (["10.0.0.0/8"], "10.0.0.5", ["6.6.6.6", "203.0.113.7"], "203.0.113.7"),  # header sent twice
        (["10.0.0.0/8"], "10.0.0.5", ["10.9.9.9"], "10.9.9.9"),  # proxies only: the farthest one
        (["10.0.0.1", "10.0.0.2"], "10.0.0.2", ["1.1.1.1, 10.0.0.3"], "10.0.0.3"),  # single addresses
        (["::1"], "::1", ["[2001:db8::1]:443"], "2001:db8::1"),
        (["10.0.0.0/8"], "::ffff:10.0.0.2", ["203.0.113.7:5678"], "203.0.113.7"),  # mapped IPv4, port
        (["10.0.0.0/8"], "10.0.0.5", ["unknown"], "unknown"),
    ],
)
def test_client_is_the_rightmost_untrusted_hop(trusted, peer, forwarded, client):
    assert ProxyRule(trusted).client_address(connection(peer, forwarded)) == client


def test_forwarded_scheme_and_host_only_from_a_trusted_peer():
    rule = ProxyRule(["10.0.0.0/8"])
    sent = {"x_forwarded_proto": "http, https", "x_forwarded_host": "evil.example, cdn.example"}
    trusted, stranger = connection("10.0.0.5", **sent), connection("198.51.100.1", **sent)
    assert (rule.forwarded_scheme(trusted), rule.forwarded_host(trusted)) == ("https", "cdn.example")
    assert (rule.forwarded_scheme(stranger), rule.forwarded_host(stranger)) == (None, None)
    odd = connection("10.0.0.5", x_forwarded_proto="javascript", x_forwarded_host="a.example/path@b")
    assert (rule.forwarded_scheme(odd), rule.forwarded_host(odd)) == (None, None)


def test_a_trusted_proxy_that_is_no_address_stops_the_start(tmp_path):
    with pytest.raises(ValueError, match=r"trusted_proxies: 'proxy\.internal' is not an IP address"):
        fake_app(tmp_path, trusted_proxies=["10.0.0.0/8", "proxy.internal"])


def test_spoofed_addresses_from_an_untrusted_client_share_its_budget_in_process(tmp_path):
    app = fake_app(tmp_path, rate_limit_requests="3/minute", trusted_proxies=["10.0.0.0/8"])
    with TestClient(app, client=("198.51.100.1", 50000)) as client:
        wait_ready(client)
        statuses = [
            client.get("/v1/models", headers={"x-forwarded-for": f"203.0.113.{i}"}).status_code for i in range(8)
        ]
        assert statuses == [200] * 3 + [429] * 5


@contextlib.contextmanager
def served_as_the_cli_serves(app: FastAPI) -> Iterator[str]:
    """Run ``app`` on a real port with the uvicorn options ``diffuser-api serve`` passes."""
    assert uvicorn_config(app, app.state.settings).proxy_headers is False
    with ThreadedServer(app) as server:
        yield server.base_url


def get_models(base_url: str, forwarded_for: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/models", headers={"x-forwarded-for": forwarded_for}, timeout=10)


@pytest.mark.slow
def test_spoofing_x_forwarded_for_gains_no_budget_on_the_real_server(tmp_path, monkeypatch):
    """The issue's case: 3/minute, 8 requests from one local client, each claiming another address."""
    with served_as_the_cli_serves(fake_app(tmp_path, rate_limit_requests="3/minute")) as base_url:
        responses = [get_models(base_url, f"203.0.113.{i}") for i in range(8)]
        assert [response.status_code for response in responses] == [200] * 3 + [429] * 5
        error = assert_envelope(responses[-1], 429, code="rate_limit_exceeded")
        assert "3/minute" in error["message"] and int(responses[-1].headers["retry-after"]) >= 1
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_behind_a_trusted_proxy_clients_are_counted_apart_and_cannot_escape(tmp_path, monkeypatch):
    app = fake_app(tmp_path, rate_limit_requests="2/minute", trusted_proxies=["127.0.0.1"])
    with served_as_the_cli_serves(app) as base_url:
        assert [get_models(base_url, "203.0.113.1").status_code for _ in range(2)] == [200, 200]
        assert_envelope(get_models(base_url, "203.0.113.1"), 429, code="rate_limit_exceeded")
        # Prepending made-up addresses changes nothing: the proxy's own entry is the right-most.
        for fake in ("6.6.6.6, 203.0.113.1", "10.0.0.1, 198.51.100.9, 203.0.113.1"):
            assert_envelope(get_models(base_url, fake), 429, code="rate_limit_exceeded")
        # Another client behind the same proxy has its own budget.
        assert get_models(base_url, "203.0.113.2").status_code == 200
        response = httpx.post(f"{base_url}{GEN}", json={"prompt": "x", "response_format": "url"},
                              headers={"x-forwarded-for": "203.0.113.3", "x-forwarded-proto": "https",
                                       "x-forwarded-host": "img.example"}, timeout=10)
        assert response.status_code == 200
        assert response.json()["data"][0]["url"].startswith("https://img.example/v1/images/files/")

