"""Shutdown under real uvicorn (in a thread, fake model): queued requests answer 503 at once,
running ones get the grace, and the whole shutdown stays within it.

tests/integration/test_shutdown.py does the same to a real ``diffuser-api serve`` process with
SIGTERM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from tests.fakes import FakeRunner, fake_app
from tests.servers import ThreadedServer
from tests.unit.test_api import GEN, assert_envelope
from tests.unit.test_streaming import sse_events


class Client(threading.Thread):
    """One request on its own thread; notes the answer and when it came."""

    def __init__(self, base_url: str, payload: dict, *, stream: bool = False) -> None:
        super().__init__(daemon=True)
        self.url, self.payload, self.stream = f"{base_url}{GEN}", payload, stream
        self.response: httpx.Response | None = None
        self.events: list[tuple[str | None, dict]] = []
        self.answered_at: float | None = None

    def run(self) -> None:
        if self.stream:
            with httpx.stream("POST", self.url, json={**self.payload, "stream": True}, timeout=30) as response:
                self.response, self.events = response, sse_events(response)
        else:
            self.response = httpx.post(self.url, json=self.payload, timeout=30)
        self.answered_at = time.monotonic()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_queued_requests_answer_503_at_once_and_the_running_one_finishes(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    grace_s = 5.0
    app = fake_app(tmp_path, runner, shutdown_grace_s=grace_s)
    with ThreadedServer(app, shutdown_grace_s=grace_s) as server:
        server.wait_ready()
        engine = next(iter(app.state.registry)).engine
        running = Client(server.base_url, {"prompt": "running"})
        running.start()
        wait_until(lambda: runner.started("running"), "the worker to start 'running'")
        queued = [Client(server.base_url, {"prompt": f"queued-{index}", "size": "64x64"}) for index in range(2)]
        queued.append(Client(server.base_url, {"prompt": "queued-stream", "size": "64x64"}, stream=True))
        for client in queued:
            client.start()
        wait_until(lambda: engine.queue_depth == 3, "three queued requests")

        shutdown_at = time.monotonic()
        server.begin_shutdown()
        for client in queued:
            client.join(5)
        for client in queued[:2]:
            assert client.answered_at is not None and client.answered_at - shutdown_at < 1.0
            error = assert_envelope(client.response, 503)
            assert "shutting down" in error["message"] and error["type"] == "server_error"
            assert float(client.response.headers["retry-after"]) >= 1
        name, body = queued[2].events[-1]
        assert name == "error" and "shutting down" in body["error"]["message"]
        assert queued[2].answered_at is not None and queued[2].answered_at - shutdown_at < 1.0

        time.sleep(0.3)
        gate.set()  # the running request finishes well within the grace
        running.join(5)
        assert running.response is not None and running.response.status_code == 200, running.response
        assert server.wait_stopped(grace_s)
        assert time.monotonic() - shutdown_at < grace_s
    assert [runner.started(f"queued-{index}") for index in range(2)] == [False, False]


def test_a_request_still_running_when_the_grace_ends_answers_503_and_shutdown_keeps_to_the_grace(tmp_path):
    gate = threading.Event()  # never opened before the grace ends
    runner = FakeRunner(gate=gate)
    grace_s = 1.5
    app = fake_app(tmp_path, runner, shutdown_grace_s=grace_s)
    try:
        with ThreadedServer(app, shutdown_grace_s=grace_s) as server:
            server.wait_ready()
            running = Client(server.base_url, {"prompt": "endless"})
            running.start()
            wait_until(lambda: runner.started("endless"), "the worker to start 'endless'")

            shutdown_at = time.monotonic()
            server.begin_shutdown()
            running.join(grace_s + 2)
            error = assert_envelope(running.response, 503)
            assert "shut down before this request finished" in error["message"]
            assert running.answered_at is not None and running.answered_at - shutdown_at < grace_s
            assert server.wait_stopped(grace_s + 2)
            assert time.monotonic() - shutdown_at <= grace_s
    finally:
        gate.set()
