"""Loading: where it runs matters to torch, even though the registry imports no torch."""

from __future__ import annotations

import asyncio
import threading
import time

from diffuser_api.engine import EngineLimits
from diffuser_api.models.registry import LoadedRunners, ModelHandle, ModelRegistry, ModelStatus
from tests.fakes import FakeRunner, fake_capabilities


def test_model_loads_on_a_thread_that_ends_with_the_load():
    """A live thread that ran torch keeps its OpenMP team, which slowed every later pipeline
    call on the worker about 2x (libgomp stops spinning when it counts more threads than cores)."""
    loading_threads: list[threading.Thread] = []

    def loader() -> LoadedRunners:
        loading_threads.append(threading.current_thread())
        return LoadedRunners(fake_capabilities(), [FakeRunner()], "FakePipeline")

    handle = ModelHandle("fake-model", loader, EngineLimits())

    async def load_and_serve() -> bool:
        """Whether the loading thread ended while the server is still up."""
        await ModelRegistry([handle]).load_all()
        try:
            deadline = time.monotonic() + 5
            while loading_threads[0].is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return not loading_threads[0].is_alive()
        finally:
            await handle.stop(grace_s=2.0)

    assert asyncio.run(asyncio.wait_for(load_and_serve(), 10))
    assert handle.status is ModelStatus.READY
    assert loading_threads[0] is not threading.main_thread()
