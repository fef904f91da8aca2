"""Streams are refused with a plain HTTP status while they still can be, and WebSocket sessions
get the same refunds and error envelopes as HTTP requests."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from websockets.sync.client import connect

from diffuser_api.engine import EngineLimits
from tests.fakes import FakeRunner, fake_app
from tests.servers import ThreadedServer
from tests.unit.test_api import assert_envelope

GEN = "/v1/images/generations"
LIMITS = EngineLimits(max_queue_size=1, request_timeout_s=10.0)


def occupy_the_queue(base_url: str, runner: FakeRunner) -> list[threading.Thread]:
    """One request running (held by the runner's closed gate), then one queued behind it: the
    queue of one is full."""

    def post(prompt: str) -> None:
        httpx.post(f"{base_url}{GEN}", json={"prompt": prompt, "size": "32x32"}, timeout=15)

    threads = [threading.Thread(target=post, args=(prompt,), daemon=True) for prompt in ("running", "queued")]
    threads[0].start()
    wait_until(lambda: runner.started("running"), "the first request runs")
    threads[1].start()
    return threads


def wait_until(condition, what: str) -> None:
    event = threading.Event()
    for _ in range(500):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError(f"never happened: {what}")


def ws_url(base_url: str) -> str:
    return f"{base_url.replace('http', 'ws')}/v1/images/ws"


def still_serves(base_url: str) -> None:
    response = httpx.post(f"{base_url}{GEN}", json={"prompt": "after", "size": "32x32"}, timeout=15)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_a_stream_to_a_full_queue_is_a_429_with_retry_after_not_a_200(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    with ThreadedServer(fake_app(tmp_path, runner, limits=LIMITS)) as server:
        server.wait_ready()
        threads = occupy_the_queue(server.base_url, runner)
        app = server.app
        wait_until(lambda: app.state.registry.resolve(None).engine.queue_depth == 1,
                   "a request queued behind the running one")
        payload = {"prompt": "streamed", "size": "32x32", "stream": True}
        response = httpx.post(f"{server.base_url}{GEN}", json=payload, timeout=15)
        error = assert_envelope(response, 429, code="rate_limit_exceeded")
        assert "queue is full" in error["message"]
        assert float(response.headers["retry-after"]) >= 1
        # The SDK sees it as the status error it retries on, not as an event inside a 200.
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.images.generate(prompt="streamed", size="32x32", stream=True)  # type: ignore[call-overload]
        gate.set()
        for thread in threads:
            thread.join(15)
        still_serves(server.base_url)


@pytest.mark.slow
def test_a_streamed_request_refused_for_a_full_queue_is_refunded(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    app = fake_app(tmp_path, runner, limits=LIMITS, rate_limit_images="3/minute")
    with ThreadedServer(app) as server:
        server.wait_ready()
        threads = occupy_the_queue(server.base_url, runner)  # two images of the three
        wait_until(lambda: app.state.registry.resolve(None).engine.queue_depth == 1,
                   "a request queued behind the running one")
        for _ in range(3):  # each refused stream gives its image back
            payload = {"prompt": "streamed", "size": "32x32", "stream": True}
            response = httpx.post(f"{server.base_url}{GEN}", json=payload, timeout=15)
            assert "queue is full" in assert_envelope(response, 429, code="rate_limit_exceeded")["message"]
        gate.set()
        for thread in threads:
            thread.join(15)
        # The third image of the budget is still there.
        still_serves(server.base_url)


@pytest.mark.slow
def test_a_websocket_session_refused_for_a_full_queue_is_refunded(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    app = fake_app(tmp_path, runner, limits=LIMITS, rate_limit_images="3/minute")
    with ThreadedServer(app) as server:
        server.wait_ready()
        threads = occupy_the_queue(server.base_url, runner)
        wait_until(lambda: app.state.registry.resolve(None).engine.queue_depth == 1,
                   "a request queued behind the running one")
        for _ in range(3):
            with connect(ws_url(server.base_url), open_timeout=5) as socket:
                socket.send(json.dumps({"prompt": "socket", "size": "32x32"}))
                message = json.loads(socket.recv(timeout=10))
            assert message["type"] == "error"
            assert message["error"]["code"] == "rate_limit_exceeded"
            assert "queue is full" in message["error"]["message"]
        gate.set()
        for thread in threads:
            thread.join(15)
        still_serves(server.base_url)


@pytest.mark.slow
def test_an_unexpected_failure_in_a_websocket_session_ends_it_with_our_envelope(tmp_path, monkeypatch):
    from diffuser_api.api import streaming

    def broken(event):
        raise RuntimeError("internal detail at 0xdeadbeef")

    with ThreadedServer(fake_app(tmp_path)) as server:
        server.wait_ready()
        monkeypatch.setattr("diffuser_api.api.websocket.websocket_message", broken)
        with connect(ws_url(server.base_url), open_timeout=5) as socket:
            socket.send(json.dumps({"prompt": "fox", "size": "32x32", "num_inference_steps": 2}))
            message = json.loads(socket.recv(timeout=10))
        assert message["type"] == "error"
        error = message["error"]
        assert error["type"] == "server_error" and error["request_id"]
        assert error["message"].startswith(streaming.UNEXPECTED_FAILURE)
        assert "0xdeadbeef" not in json.dumps(message)
        monkeypatch.undo()
        still_serves(server.base_url)
