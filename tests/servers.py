"""An in-process uvicorn server on a free loopback port.

For tests and benchmarks that need real HTTP (sockets, disconnects, uvicorn's own protocol)
while keeping the app's parts in reach: a fake runner whose steps they count, or a pipeline
already in memory. Imports neither pytest nor torch, so benchmark scripts can use it too.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Self

import httpx
import uvicorn
from fastapi import FastAPI

from diffuser_api.cli import uvicorn_config
from diffuser_api.serving import DrainingServer


class ThreadedServer:
    """``with ThreadedServer(app) as server:`` serves ``app`` until the block ends."""

    def __init__(self, app: FastAPI, *, start_timeout_s: float = 30.0, shutdown_grace_s: float | None = None) -> None:
        """With ``shutdown_grace_s``, shutdown drains the models as ``diffuser-api serve`` does."""
        # Port 0: the OS picks a free port at bind time, so parallel runs never collide.
        self.app = app
        # As `diffuser-api serve` runs it (proxy headers, WebSocket size...), on a free port.
        grace_s = 5 if shutdown_grace_s is None else shutdown_grace_s
        config = uvicorn_config(app, app.state.settings, host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=grace_s)
        self._server = (
            uvicorn.Server(config)
            if shutdown_grace_s is None
            else DrainingServer(config, app.state.registry, shutdown_grace_s)
        )
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self._start_timeout_s = start_timeout_s
        self.base_url = ""

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until /health says the model has loaded."""
        deadline = time.monotonic() + timeout_s
        while httpx.get(f"{self.base_url}/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model was not ready within {timeout_s} s")
            time.sleep(0.02)

    def begin_shutdown(self) -> None:
        """What uvicorn's SIGTERM handler does (signals reach only the main thread)."""
        self._server.should_exit = True

    def wait_stopped(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.begin_shutdown()
        self._thread.join(15)
