"""Cancellation seen through real HTTP: uvicorn on a socket, a client that gives up.

The fake runner counts the steps it runs, so a test can tell whether work kept going after the
client left. Every wait is bounded: a broken disconnect watcher fails a test, it never hangs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from diffuser_api.config import Settings
from diffuser_api.config.models_file import engine_limits
from diffuser_api.engine import Engine
from tests.fakes import FakeRunner, fake_app, png_bytes
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"
VAR = "/v1/images/variations"
GIVE_UP_AFTER_S = 1.0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def engine_of(server: ThreadedServer) -> Engine:
    return next(iter(server.app.state.registry)).engine


@pytest.fixture()
def serve(tmp_path) -> Iterator[Callable[..., ThreadedServer]]:
    """Start the fake-model app under uvicorn with the given runner and app options."""
    with contextlib.ExitStack() as stack:
        runners: list[FakeRunner] = []

        def start(runner: FakeRunner, **app_options: Any) -> ThreadedServer:
            server = stack.enter_context(ThreadedServer(fake_app(tmp_path, runner, **app_options)))
            runners.append(runner)
            server.wait_ready()
            return server

        yield start
        for runner in runners:
            runner.gate.set()  # a failed test must not leave a worker waiting at shutdown


def give_up(server: ThreadedServer, path: str, **request: Any) -> None:
    """Send a request and walk away after GIVE_UP_AFTER_S, closing the connection."""
    with httpx.Client(base_url=server.base_url, timeout=GIVE_UP_AFTER_S) as client, pytest.raises(httpx.ReadTimeout):
        client.post(path, **request)


def test_disconnected_queued_request_never_runs(serve):
    runner = FakeRunner()
    server = serve(runner)
    runner.gate.clear()
    outcome: dict[str, int] = {}

    def blocker() -> None:
        response = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "blocker", "size": "32x32"}, timeout=30)
        outcome["blocker"] = response.status_code

    thread = threading.Thread(target=blocker)
    thread.start()
    try:
        wait_until(lambda: runner.started("blocker"), "the worker to start the blocker")
        give_up(server, GEN, json={"prompt": "queued", "size": "32x32"})
        wait_until(lambda: engine_of(server).queue_depth == 0, "the server to drop the queued job")
    finally:
        runner.gate.set()
        thread.join(30)
    assert outcome == {"blocker": 200}
    after = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "after", "size": "32x32"}, timeout=30)
    assert after.status_code == 200
    assert not runner.started("queued")


@pytest.mark.parametrize(
    "path, request_options",
    [
        (GEN, {"json": {"prompt": "running", "size": "32x32", "num_inference_steps": 90}}),
        (VAR, {"files": {"image": ("in.png", png_bytes((32, 32)), "image/png")},
               "data": {"num_inference_steps": "90", "size": "32x32"}}),
    ],
    ids=["json", "multipart"],
)
def test_disconnected_running_request_stops_within_a_step_of_noticing(serve, path, request_options):
    # A step is 0.2 s: the server's allowance to notice the disconnect. Past the step running
    # when the client left, one more may start before the server notices, however prompt it
    # is, when that step ends in the moment the closing connection takes to reach it.
    runner = FakeRunner(step_delay_s=0.2)
    server = serve(runner)
    give_up(server, path, **request_options)
    assert runner.batches, f"the request did not start within {GIVE_UP_AFTER_S} s"
    batch = runner.batches[0]
    steps_at_disconnect = batch.steps
    wait_until(lambda: batch.finished_at is not None, "the abandoned batch to stop")
    assert 0 < steps_at_disconnect < 90
    assert batch.steps - steps_at_disconnect <= 2
    started = time.monotonic()
    response = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "next", "size": "32x32"}, timeout=30)
    assert response.status_code == 200
    assert time.monotonic() - started < 5, "the worker stayed busy after the client left"


def test_request_past_the_timeout_answers_504_and_stops_its_work(serve, monkeypatch):
    monkeypatch.setenv("DIFFUSER_REQUEST_TIMEOUT_S", "0.3")
    runner = FakeRunner(step_delay_s=0.05)
    server = serve(runner, limits=engine_limits(Settings(_env_file=None)), max_steps=200)
    response = httpx.post(
        f"{server.base_url}{GEN}", json={"prompt": "slow", "size": "32x32", "num_inference_steps": 200}, timeout=30
    )
    assert response.status_code == 504, response.text
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["type"] == "timeout_error" and error["code"] == "timeout"
    assert error["request_id"] == response.headers["x-request-id"]
    assert "0.3 s" in error["message"]
    batch = runner.batches[0]
    wait_until(lambda: batch.finished_at is not None, "the timed-out batch to stop")
    assert batch.steps < 200
