"""Fixtures shared by the client's tests (test_cli.py, test_cli_jobs.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes import FakeRunner, fake_app
from tests.servers import ThreadedServer


@pytest.fixture()
def serve(tmp_path) -> Iterator[Callable[..., ThreadedServer]]:
    """The fake-model app under uvicorn with the given runner and settings."""
    with contextlib.ExitStack() as stack:
        runners: list[FakeRunner] = []

        def start(runner: FakeRunner | None = None, **settings: Any) -> ThreadedServer:
            runner = runner or FakeRunner()
            server = stack.enter_context(ThreadedServer(fake_app(tmp_path / "server", runner, **settings)))
            runners.append(runner)
            server.wait_ready()
            return server

        yield start
        for runner in runners:
            runner.gate.set()
