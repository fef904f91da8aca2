"""Requests and images per key (or client address): 429 with OpenAI's headers, and the SDK's
retry waits as long as Retry-After says."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest
import yaml
from fastapi.testclient import TestClient

from diffuser_api.api.rate_limits import STORE_PAUSE_S, openai_duration
from diffuser_api.config import Settings
from diffuser_api.engine import EngineLimits
from tests.fakes import FakeRunner, fake_app
from tests.unit.test_api import GEN, assert_envelope, wait_ready
from tests.unit.test_auth import bearer, sdk, sha


def limited(tmp_path, **settings) -> TestClient:
    return TestClient(fake_app(tmp_path, **settings))


def test_requests_limit_by_address_gives_429_with_headers(tmp_path):
    with limited(tmp_path, rate_limit_requests="2/minute") as client:
        wait_ready(client)  # /health is public: not counted
        first, second = (client.get("/v1/models") for _ in range(2))
        assert first.status_code == second.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second)] == ["1", "0"]
        refused = client.get("/v1/models")
        error = assert_envelope(refused, 429, code="rate_limit_exceeded")
        assert error["type"] == "requests" and "2/minute" in error["message"]
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-images" not in refused.headers


def test_images_limit_counts_n(tmp_path):
    with limited(tmp_path, rate_limit_images="5/minute") as client:
        wait_ready(client)
        ok = client.post(GEN, json={"prompt": "x", "n": 3})
        assert ok.status_code == 200
        assert (ok.headers["x-ratelimit-limit-images"], ok.headers["x-ratelimit-remaining-images"]) == ("5", "2")
        refused = client.post(GEN, json={"prompt": "x", "n": 3})
        assert_envelope(refused, 429, code="rate_limit_exceeded")
        assert refused.headers["x-ratelimit-remaining-images"] == "2" and int(refused.headers["retry-after"]) >= 1
        assert client.post(GEN, json={"prompt": "x", "n": 2}).status_code == 200
        # More than the whole budget can never succeed: a 400 naming n, not a 429 to retry.
        assert_envelope(client.post(GEN, json={"prompt": "x", "n": 6}), 400, "n")


def test_refused_requests_spend_no_image_budget(tmp_path):
    with limited(tmp_path, rate_limit_images="2/minute") as client:
        wait_ready(client)
        assert_envelope(client.post(GEN, json={"prompt": "x", "n": 2, "size": "13x7"}), 400, "size")
        assert_envelope(client.post(GEN, json={"prompt": "x", "n": 2, "stream": True, "size": "13x7"}), 400, "size")
        assert client.post(GEN, json={"prompt": "x", "n": 2}).status_code == 200
        assert_envelope(client.post(GEN, json={"prompt": "x"}), 429, code="rate_limit_exceeded")


def test_per_key_overrides_and_separate_budgets(tmp_path):
    keys = [
        {"name": "small", "key_sha256": sha("sk-small"), "limits": {"requests": "1/minute"}},
        {"name": "big", "key_sha256": sha("sk-big")},
    ]
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys))
    with limited(tmp_path, api_keys_file=keys_file, rate_limit_requests="3/minute") as client:
        wait_ready(client)
        assert client.get("/v1/models", headers=bearer("sk-small")).status_code == 200
        assert_envelope(client.get("/v1/models", headers=bearer("sk-small")), 429)
        statuses = [client.get("/v1/models", headers=bearer("sk-big")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        # Refused keys are not charged against anyone.
        assert_envelope(client.get("/v1/models", headers=bearer("sk-nobody")), 401)


def test_sdk_retry_waits_for_retry_after_then_succeeds(tmp_path):
    with limited(tmp_path, api_keys=["sk-k"], rate_limit_requests="1 per 2 seconds") as client:
        wait_ready(client)
        seen: list[tuple[int, str | None]] = []
        client.event_hooks["response"].append(lambda r: seen.append((r.status_code, r.headers.get("retry-after"))))
        images = sdk(client, "sk-k", max_retries=2).images
        images.generate(prompt="first", size="32x32")
        started = time.monotonic()
        result = images.generate(prompt="second", size="32x32")
        waited = time.monotonic() - started
        assert result.data[0].b64_json
        assert seen == [(200, None), (429, "2"), (200, None)]
        assert 1.5 <= waited < 4  # Retry-After, not the SDK's own 0.5 s backoff


def test_sdk_without_retries_sees_rate_limit_error(tmp_path):
    with limited(tmp_path, api_keys=["sk-k"], rate_limit_requests="1/minute") as client:
        wait_ready(client)
        images = sdk(client, "sk-k", max_retries=0).images
        images.generate(prompt="x", size="32x32")
        with pytest.raises(openai.RateLimitError) as caught:
            images.generate(prompt="x", size="32x32")
        assert caught.value.code == "rate_limit_exceeded"
        assert caught.value.response.headers["x-ratelimit-limit-requests"] == "1"


def test_no_limits_no_headers(tmp_path):
    with limited(tmp_path) as client:
        wait_ready(client)
        response = client.post(GEN, json={"prompt": "x"})
        assert not [name for name in response.headers if name.startswith("x-ratelimit")]


@pytest.mark.parametrize(("seconds", "text"), [(0.017, "17ms"), (1.0, "1s"), (59.2, "1m0s"), (360, "6m0s")])
def test_reset_durations_in_openai_style(seconds, text):
    assert openai_duration(seconds) == text


@pytest.mark.parametrize(
    ("value", "stored"), [(60, "60/minute"), ("60", "60/minute"), ("5 per 2 seconds", "5 per 2 seconds")]
)
def test_limit_settings(value, stored):
    assert Settings(_env_file=None, rate_limit_requests=value).rate_limit_requests == stored


def test_bad_limit_setting_is_refused():
    with pytest.raises(ValueError, match="rate_limit_images"):
        Settings(_env_file=None, rate_limit_images="lots per minute")


def test_forwarded_address_counts_only_from_trusted_proxies(tmp_path):
    app = fake_app(tmp_path, rate_limit_requests="1/minute", trusted_proxies=["10.0.0.0/8"])
    with TestClient(app, client=("10.0.0.5", 50000)) as client:  # a trusted proxy
        wait_ready(client)
        for address in ("203.0.113.1", "203.0.113.2"):
            assert client.get("/v1/models", headers={"x-forwarded-for": address}).status_code == 200
        assert_envelope(client.get("/v1/models", headers={"x-forwarded-for": "203.0.113.1"}), 429)
        # The client's own made-up entries are left of the one the proxy appended.
        assert_envelope(client.get("/v1/models", headers={"x-forwarded-for": "1.2.3.4, 203.0.113.1"}), 429)
    app = fake_app(tmp_path, rate_limit_requests="1/minute", trusted_proxies=["10.0.0.0/8"])
    with TestClient(app, client=("198.51.100.1", 50000)) as client:  # not a proxy
        wait_ready(client)
        assert client.get("/v1/models", headers={"x-forwarded-for": "203.0.113.1"}).status_code == 200
        assert_envelope(client.get("/v1/models", headers={"x-forwarded-for": "203.0.113.2"}), 429)


@pytest.fixture()
def redis_uri():
    """A Redis protocol server on a free loopback port (fakeredis, with Lua for the limits
    library's scripts), so the shared-store path runs against a real socket."""
    import threading

    from fakeredis import TcpFakeServer

    from tests.conftest import free_port

    port = free_port()
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def test_replicas_share_counts_through_redis(tmp_path, redis_uri):
    """Two servers (replicas) with one Redis store enforce one budget between them."""
    settings = {"rate_limit_requests": "3/minute", "rate_limit_storage_uri": redis_uri}
    with limited(tmp_path / "a", **settings) as first, limited(tmp_path / "b", **settings) as second:
        wait_ready(first)
        wait_ready(second)
        statuses = [client.get("/v1/models").status_code for client in (first, second, first)]
        assert statuses == [200, 200, 200]
        assert_envelope(second.get("/v1/models"), 429, code="rate_limit_exceeded")
        assert_envelope(first.get("/v1/models"), 429, code="rate_limit_exceeded")


@pytest.fixture()
def hanging_store_uri():
    """A TCP server that takes connections and never answers: a store that hangs."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}"


def store_errors_counted(client: TestClient, **headers: str) -> float:
    for line in client.get("/metrics", headers=headers).text.splitlines():
        if line.startswith("diffuser_rate_limit_store_errors_total "):
            return float(line.split()[1])
    raise AssertionError("diffuser_rate_limit_store_errors_total is not exported")


STORE_DOWN = {"rate_limit_requests": "3/minute", "rate_limit_images": "5/minute", "rate_limit_store_timeout_s": 0.3}


@pytest.mark.parametrize("store", ["unreachable", "hanging"])
def test_store_down_with_allow_serves_counts_and_logs_once(tmp_path, store, hanging_store_uri, caplog):
    from tests.conftest import free_port

    uri = hanging_store_uri if store == "hanging" else f"redis://127.0.0.1:{free_port()}"  # nothing listens
    caplog.set_level(logging.WARNING, logger="diffuser_api.api.rate_limits")
    # The limiter connects to nothing when built: the server starts with its store down.
    with limited(tmp_path, rate_limit_storage_uri=uri, api_keys=["sk-good"], **STORE_DOWN) as client:
        wait_ready(client)
        started = time.monotonic()
        for _ in range(5):  # more than the limit: nothing can be counted, so nothing is refused
            response = client.get("/v1/models", headers=bearer("sk-good"))
            assert response.status_code == 200 and "x-ratelimit-limit-requests" not in response.headers
        # Store calls are bounded (0.3 s), and after a failure the store is left alone for a moment.
        assert time.monotonic() - started < 2
        assert client.post(GEN, json={"prompt": "x"}, headers=bearer("sk-good")).status_code == 200
        assert_envelope(client.get("/v1/models", headers=bearer("sk-wrong")), 401)
        assert store_errors_counted(client, **bearer("sk-good")) >= 11
        warnings = [record for record in caplog.records if "rate-limit store failed" in record.getMessage()]
        assert len(warnings) == 1 and "sk-good" not in warnings[0].getMessage()


@pytest.mark.parametrize("store", ["unreachable", "hanging"])
def test_store_down_with_deny_is_503_with_retry_after(tmp_path, store, hanging_store_uri):
    from tests.conftest import free_port

    uri = hanging_store_uri if store == "hanging" else f"redis://127.0.0.1:{free_port()}"
    settings = {"rate_limit_storage_uri": uri, "rate_limit_on_store_error": "deny", "metrics_public": True}
    with limited(tmp_path, **settings, **STORE_DOWN) as client:
        wait_ready(client)  # /health counts nothing, so it answers
        for request in (lambda: client.get("/v1/models"), lambda: client.post(GEN, json={"prompt": "x"})):
            started = time.monotonic()
            response = request()
            assert time.monotonic() - started < 2
            error = assert_envelope(response, 503)
            assert error["type"] == "server_error" and "Rate limits cannot be checked" in error["message"]
            assert "redis" not in error["message"].lower() and int(response.headers["retry-after"]) >= 1
        assert store_errors_counted(client) >= 2


def test_deny_serves_again_once_the_store_is_back(tmp_path):
    import threading

    from fakeredis import TcpFakeServer

    from tests.conftest import free_port

    port = free_port()
    settings = {"rate_limit_storage_uri": f"redis://127.0.0.1:{port}", "rate_limit_on_store_error": "deny",
                **STORE_DOWN}
    with limited(tmp_path, **settings) as client:
        wait_ready(client)
        assert_envelope(client.get("/v1/models"), 503)
        server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        time.sleep(STORE_PAUSE_S)  # the store is left alone this long after a failure
        try:
            response = client.get("/v1/models")
            assert response.status_code == 200 and response.headers["x-ratelimit-remaining-requests"] == "2"
            assert client.post(GEN, json={"prompt": "x"}).status_code == 200
        finally:
            server.shutdown()
            server.server_close()


def budget_app(tmp_path, strategy: str, limits: EngineLimits, runner: FakeRunner, store: str = "memory://"):
    """Key "caller" has 2 images a minute; key "filler" no limit, to fill the worker and the queue."""
    keys = [
        {"name": "caller", "key_sha256": sha("sk-caller"), "limits": {"images": "2/minute"}},
        {"name": "filler", "key_sha256": sha("sk-filler")},
    ]
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(keys))
    return fake_app(tmp_path, runner, limits=limits, api_keys_file=tmp_path / "keys.yaml",
                    rate_limit_strategy=strategy, rate_limit_storage_uri=store,
                    rate_limit_store_timeout_s=1.0)  # the longest allowed: fakeredis on a busy test machine


def fill(client: TestClient, prompts: tuple[str, ...], results: list[int]) -> list[threading.Thread]:
    """One blocked request per prompt from "filler": the first runs (its step is held), the rest wait."""
    threads = []
    for prompt in prompts:
        post = lambda p=prompt: results.append(  # noqa: E731
            client.post(GEN, json={"prompt": p}, headers=bearer("sk-filler")).status_code
        )
        threads.append(threading.Thread(target=post))
        threads[-1].start()
        time.sleep(0.3)
    return threads


def generate(client: TestClient, n: int, **extra) -> httpx.Response:
    return client.post(GEN, json={"prompt": "mine", "n": n, **extra}, headers=bearer("sk-caller"))


@pytest.mark.parametrize(
    ("strategy", "store"),
    [("moving-window", "memory"), ("fixed-window", "memory"), ("sliding-window-counter", "memory"),
     ("moving-window", "redis"), ("sliding-window-counter", "redis")],
)
def test_images_of_requests_refused_by_a_full_queue_are_refunded(tmp_path, strategy, store, request):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    limits = EngineLimits(max_queue_size=1, max_batch_size=1, request_timeout_s=10)
    uri = request.getfixturevalue("redis_uri") if store == "redis" else "memory://"
    with TestClient(budget_app(tmp_path, strategy, limits, runner, uri)) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        results: list[int] = []
        threads = fill(client, ("running", "queued"), results)
        for _ in range(2):  # twice: images refunded once can be refunded again
            refused = generate(client, 2)
            error = assert_envelope(refused, 429, code="rate_limit_exceeded")
            assert "queue is full" in error["message"]
            assert refused.headers["x-ratelimit-remaining-images"] == "2"
        # A stream is refused before its 200 too, and refunded all the same.
        streamed = client.post(GEN, json={"prompt": "mine", "n": 2, "stream": True}, headers=bearer("sk-caller"))
        assert "queue is full" in assert_envelope(streamed, 429, code="rate_limit_exceeded")["message"]
        gate.set()
        for thread in threads:
            thread.join(10)
        assert results == [200, 200]
        ran = generate(client, 2)
        assert ran.status_code == 200 and ran.headers["x-ratelimit-remaining-images"] == "0"
        # The budget is spent by the request that ran, and only by it.
        error = assert_envelope(generate(client, 1), 429, code="rate_limit_exceeded")
        assert "Rate limit reached for images" in error["message"]


def test_images_of_a_request_that_timed_out_in_the_queue_are_refunded(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    limits = EngineLimits(max_queue_size=4, max_batch_size=1, request_timeout_s=0.5)
    with TestClient(budget_app(tmp_path, "moving-window", limits, runner)) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        results: list[int] = []
        threads = fill(client, ("running",), results)
        timed_out = generate(client, 2)  # waits behind the held step, never starts
        assert timed_out.status_code in (503, 504)  # 503 once the engine calls a queued timeout Unavailable
        assert_envelope(timed_out, timed_out.status_code)
        gate.set()
        for thread in threads:
            thread.join(10)
        assert generate(client, 2).status_code == 200
        assert_envelope(generate(client, 1), 429, code="rate_limit_exceeded")


def test_images_of_a_request_that_ran_are_not_refunded(tmp_path):
    runner = FakeRunner(fail_on={"explode": RuntimeError("boom")})
    limits = EngineLimits(request_timeout_s=10)
    with TestClient(budget_app(tmp_path, "moving-window", limits, runner), raise_server_exceptions=False) as client:
        wait_ready(client)
        failed = client.post(GEN, json={"prompt": "explode", "n": 2}, headers=bearer("sk-caller"))
        assert failed.status_code == 500
        assert_envelope(generate(client, 1), 429, code="rate_limit_exceeded")


@pytest.mark.slow
def test_images_of_a_request_whose_client_left_while_queued_are_refunded(tmp_path):
    from tests.servers import ThreadedServer

    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    limits = EngineLimits(max_queue_size=4, max_batch_size=1, request_timeout_s=10)
    with ThreadedServer(budget_app(tmp_path, "moving-window", limits, runner)) as server:
        gate.set()
        server.wait_ready()
        gate.clear()
        url, caller = f"{server.base_url}{GEN}", bearer("sk-caller")
        filler = threading.Thread(
            target=lambda: httpx.post(url, json={"prompt": "running"}, headers=bearer("sk-filler"), timeout=15)
        )
        filler.start()
        time.sleep(0.3)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its job is still queued
            httpx.post(url, json={"prompt": "mine", "n": 2}, headers=caller, timeout=0.5)
        time.sleep(0.3)  # the server notices the disconnect and drops the job
        gate.set()
        filler.join(15)
        ran = httpx.post(url, json={"prompt": "mine", "n": 2}, headers=caller, timeout=15)
        assert ran.status_code == 200 and ran.headers["x-ratelimit-remaining-images"] == "0"
        assert_envelope(httpx.post(url, json={"prompt": "mine"}, headers=caller, timeout=15), 429)
