"""Loading: where it runs matters to torch, even though the registry imports no torch."""

from __future__ import annotations

import asyncio
import threading
import time

from diffuser_api.models.registry import ModelStatus
from tests.fakes import FakeLoadedModel, FakeModel, fake_registry


def test_model_loads_on_a_thread_that_ends_with_the_load():
    """A live thread that ran torch keeps its OpenMP team, which slowed every later pipeline
    call on the worker about 2x (libgomp stops spinning when it counts more threads than cores)."""
    loading_threads: list[threading.Thread] = []

    class Recorded(FakeModel):
        def load(self) -> FakeLoadedModel:
            loading_threads.append(threading.current_thread())
            return super().load()

    registry = fake_registry([Recorded("fake-model", pinned=True)])

    async def load_and_serve() -> bool:
        """Whether the loading thread ended while the server is still up."""
        await registry.start()
        try:
            deadline = time.monotonic() + 5
            while loading_threads[0].is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return not loading_threads[0].is_alive()
        finally:
            await registry.stop(grace_s=2.0)

    assert asyncio.run(asyncio.wait_for(load_and_serve(), 10))
    assert registry.default.status is ModelStatus.READY
    assert loading_threads[0] is not threading.main_thread()
