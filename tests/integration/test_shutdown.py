"""SIGTERM: the server stops taking work, finishes what it has, then exits cleanly."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow


def test_sigterm_finishes_in_flight_request(tmp_path):
    server = LiveServer(tmp_path)
    try:
        server.wait_ready()
        outcome: dict[str, object] = {}

        def slow_request() -> None:
            payload = {"prompt": "slow", "size": "256x256", "num_inference_steps": 40}
            outcome["status"] = httpx.post(
                f"{server.base_url}/v1/images/generations", json=payload, timeout=120
            ).status_code

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        exit_code = server.stop()
        thread.join(60)
        assert outcome.get("status") == 200
        # uvicorn re-raises the signal after its graceful shutdown, as a Unix server should.
        assert exit_code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log.read_text()
    finally:
        server.stop()
