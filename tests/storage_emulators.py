"""Real S3 and GCS HTTP APIs on this machine: moto in server mode and gcp-storage-emulator,
each on a free port, started and stopped by the test fixtures that use them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

# gcsfs first asks a gRPC control plane for the bucket type, which the emulator does not
# answer: every call would wait 60 s before falling back. Set it before gcsfs is imported.
GCS_ENVIRONMENT = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _command(name: str) -> str:
    """The console script next to this interpreter (the venv's), else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; pip install '.[test]'")
    return found


class Emulator:
    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = log
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"emulator exited early:\n{self.log.read_text()}")
            try:
                httpx.get(self.endpoint, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"emulator not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_moto(folder: Path) -> Emulator:
    port = free_port()
    emulator = Emulator([_command("moto_server"), "-p", str(port)], port, folder / "moto.log")
    emulator.wait_ready()
    return emulator


def start_gcs(folder: Path) -> Emulator:
    port = free_port()
    command = [_command("gcp-storage-emulator"), "start", "--port", str(port), "--in-memory"]
    emulator = Emulator(command, port, folder / "gcs.log")
    emulator.wait_ready()
    return emulator


def s3_options(endpoint: str) -> dict:
    client = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    return {"key": "testing", "secret": "testing", "client_kwargs": client}


def gcs_options(endpoint: str) -> dict:
    return {"token": "anon", "project": "test", "endpoint_url": endpoint}
