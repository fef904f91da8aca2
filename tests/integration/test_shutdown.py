"""SIGTERM to a real ``diffuser-api serve`` process: the server stops taking work, answers
queued requests 503 at once, lets running ones finish within the grace, and exits within it.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"


class Request(threading.Thread):
    def __init__(self, server: LiveServer, payload: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.payload = f"{server.base_url}{GEN}", payload
        self.response: httpx.Response | None = None
        self.answered_at: float | None = None

    def run(self) -> None:
        self.response = httpx.post(self.url, json=self.payload, timeout=120)
        self.answered_at = time.monotonic()


def gauge(server: LiveServer, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sigterm(server: LiveServer) -> float:
    signalled_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    return signalled_at


def test_sigterm_answers_queued_requests_at_once_and_finishes_the_running_one(tmp_path):
    grace_s = 60.0
    server = LiveServer(tmp_path, DIFFUSER_SHUTDOWN_GRACE_S=str(grace_s))
    try:
        server.wait_ready()
        running = Request(server, {"prompt": "running", "size": "256x256", "num_inference_steps": 40})
        running.start()
        wait_until(lambda: gauge(server, "diffuser_busy_workers") == 1, "the worker to start 'running'")
        queued = [Request(server, {"prompt": f"queued {index}", "size": "64x64"}) for index in range(2)]
        for request in queued:
            request.start()
        wait_until(lambda: gauge(server, "diffuser_queue_depth") == 2, "two queued requests")
        assert running.response is None, "the running request finished before the test could queue others"

        signalled_at = sigterm(server)
        for request in queued:
            request.join(10)
            assert request.response is not None and request.response.status_code == 503, request.response
            error = request.response.json()["error"]
            assert "shutting down" in error["message"] and error["request_id"]
            assert float(request.response.headers["retry-after"]) >= 1
            assert request.answered_at is not None and request.answered_at - signalled_at < 1.0
        running.join(grace_s)
        assert running.response is not None and running.response.status_code == 200
        exit_code = server.process.wait(grace_s)
        assert time.monotonic() - signalled_at < grace_s
        # uvicorn re-raises the signal after its graceful shutdown, as a Unix server should.
        assert exit_code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log.read_text()
    finally:
        server.stop()


def test_sigterm_ends_a_request_still_running_at_the_grace_and_exits_within_it(tmp_path):
    grace_s = 2.0
    # 1000 steps take far longer than the grace on any machine, however idle.
    server = LiveServer(tmp_path, DIFFUSER_SHUTDOWN_GRACE_S=str(grace_s), DIFFUSER_MAX_STEPS="1000")
    try:
        server.wait_ready()
        running = Request(server, {"prompt": "endless", "size": "256x256", "num_inference_steps": 1000})
        running.start()
        wait_until(lambda: gauge(server, "diffuser_busy_workers") == 1, "the worker to start 'endless'")

        signalled_at = sigterm(server)
        running.join(grace_s + 5)
        assert running.response is not None and running.response.status_code == 503, running.response
        assert "shut down before this request finished" in running.response.json()["error"]["message"]
        assert running.answered_at is not None and running.answered_at - signalled_at < grace_s
        server.process.wait(grace_s + 5)
        exited_after_s = time.monotonic() - signalled_at
        assert exited_after_s <= grace_s, f"shutdown took {exited_after_s:.2f} s with a grace of {grace_s} s"
    finally:
        server.stop()
