"""Shared fixtures. Fake-model tests need nothing here; integration tests start real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

# Tiny models are built once per machine and reused across runs (they are deterministic).
TINY_CACHE = Path(os.environ.get("DIFFUSER_TEST_CACHE", Path.home() / ".cache" / "diffuser-api-tests"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real ``diffuser-api serve`` process on a free port, as users run it."""

    def __init__(self, tmp: Path, model_id: str = "tiny-sd", *, args: Sequence[str] = (), **env: str) -> None:
        """``args``: more ``serve`` flags (``--ray-address ...``)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "DIFFUSER_MODEL_ID": model_id,
            "DIFFUSER_CACHE_DIR": str(TINY_CACHE),
            "DIFFUSER_STORAGE_DIR": str(tmp / "images"),
            "DIFFUSER_PORT": str(self.port),
            "DIFFUSER_REQUEST_TIMEOUT_S": "120",
            # Each server its own jobs database, not one shared through the tiny-model cache.
            "DIFFUSER_JOBS_URL": f"sqlite:///{tmp / 'jobs.sqlite3'}",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "diffuser_api", "serve", *args],
            env=environment,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@pytest.fixture(scope="session")
def tiny_sd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("tiny-sd"), DIFFUSER_MAX_UPLOAD_BYTES=str(256 * 1024))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture()
def client(tiny_sd_server: LiveServer):
    import openai

    return openai.OpenAI(base_url=f"{tiny_sd_server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tiny_lora():
    """``tiny_lora(model_id, seed, **shape)``: the file of a random LoRA for a tiny model, built with
    peft once per machine and cached next to the tiny models (deterministic per seed)."""
    from diffuser_api.models.tiny.loras import ensure_tiny_lora

    return lambda model_id, seed, **shape: ensure_tiny_lora(model_id, seed, TINY_CACHE, **shape)
