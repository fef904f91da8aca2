"""The registry alone: names, probes, health, admin loads and unloads, deadlines, shutdown; and
where loading runs, which matters to torch even though the registry imports no torch."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from diffuser_api.engine import EngineLimits
from diffuser_api.errors import ModelNotFound, Unavailable
from diffuser_api.models.registry import ModelStatus
from tests.fakes import FakeLoadedModel, FakeModel, FakeRunner, fake_registry, image_job
from tests.unit.test_engine import run_async, wait_until


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


def test_names_resolve_to_ids_aliases_and_the_default_within_what_a_caller_may_use():
    registry = fake_registry([FakeModel("model-a"), FakeModel("model-b", aliases=("dall-e-3", "fast"))])
    assert {registry.resolve(name).id for name in (None, "", "dall-e-2", "gpt-image-1")} == {"model-a"}
    assert registry.resolve("dall-e-3").id == registry.resolve("fast").id == "model-b"
    assert registry.ids_for(["fast", "model-a", "dall-e-2"]) == frozenset({"model-a", "model-b"})
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        registry.ids_for(["nope"])
    only_b = frozenset({"model-b"})
    assert registry.resolve("fast", only_b).id == "model-b"
    for name in ("model-a", None, "dall-e-2", "nope"):
        with pytest.raises(ModelNotFound) as hidden:
            registry.resolve(name, only_b)
        assert hidden.value.code == "model_not_found" and hidden.value.message.endswith("Served models: model-b")
    with pytest.raises(ModelNotFound):
        registry.get("fast")  # aliases are not models
    with pytest.raises(ModelNotFound):
        registry.get("model-a", only_b)
    strict = fake_registry([FakeModel("model-a")], strict_names=True)
    with pytest.raises(ModelNotFound, match="Served models: model-a"):
        strict.resolve("dall-e-2")


def test_an_unreadable_checkpoint_leaves_its_model_failed_and_the_others_serving():
    registry = fake_registry([FakeModel("model-a"), FakeModel("model-b", probe_error=OSError("no model_index.json"))])
    broken = registry.get("model-b")
    assert broken.status is ModelStatus.FAILED
    with pytest.raises(Unavailable, match="model 'model-b' failed to load"):
        broken.capabilities  # noqa: B018
    assert registry.get("model-a").capabilities.family == "fake"


@run_async
async def test_health_waits_for_pinned_models_only() -> None:
    gate = threading.Event()
    pinned = FakeModel("model-b", pinned=True, load_gate=gate)
    registry = fake_registry([FakeModel("model-a"), pinned])
    starting = asyncio.ensure_future(registry.start())
    try:
        await wait_until(lambda: registry.get("model-b").status is ModelStatus.LOADING, "the pinned load")
        problem = registry.health_problem()
        assert problem is not None and problem.message == "model 'model-b' is still loading"
        assert registry.get("model-a").status is ModelStatus.UNLOADED  # not pinned: loads on demand
        gate.set()
        await starting
        assert registry.health_problem() is None
    finally:
        gate.set()
        await registry.stop(grace_s=1.0)


@run_async
async def test_admin_load_and_unload_and_an_unload_waits_for_the_running_batch() -> None:
    runner = FakeRunner("fake#0", gate=threading.Event())
    registry = fake_registry([FakeModel("model-a"), FakeModel("model-b", runner=runner)])
    await registry.start()
    try:
        model = registry.get("model-b")
        assert registry.start_load("model-b") is True
        await wait_until(lambda: model.status is ModelStatus.READY, "the admin load")
        assert registry.start_load("model-b") is False
        async with registry.lease(model, deadline=time.monotonic() + 5) as engine:
            running = asyncio.ensure_future(engine.submit(image_job("slow")))
            await wait_until(lambda: runner.started("slow"), "the batch to run")
        assert registry.start_unload("model-b") is True
        await asyncio.sleep(0.1)
        assert model.status is ModelStatus.READY, "unloaded under a running batch"
        runner.gate.set()
        assert len(await running) == 1
        await wait_until(lambda: model.status is ModelStatus.UNLOADED, "the unload")
        assert registry.start_unload("model-b") is False
        with pytest.raises(ModelNotFound):
            registry.start_load("nope")
    finally:
        runner.gate.set()
        await registry.stop(grace_s=1.0)


@run_async
async def test_a_request_that_spent_its_time_loading_is_503_if_it_never_starts() -> None:
    """The deadline covers the load: what is left for the queue is what the load left."""
    gate = threading.Event()
    model = FakeModel("model-a", runner=FakeRunner("fake#0", gate=gate), limits=EngineLimits(request_timeout_s=5))
    registry = fake_registry([model])
    await registry.start()
    served = registry.default
    try:
        async with registry.lease(served, deadline=time.monotonic() + 5) as engine:
            blocking = asyncio.ensure_future(engine.submit(image_job("blocking")))
            await wait_until(lambda: model.runner.started("blocking"), "the first batch")
            with pytest.raises(Unavailable, match="without starting"):
                await engine.submit(image_job("late"), deadline=time.monotonic() + 0.2)
        gate.set()
        await blocking
    finally:
        gate.set()
        await registry.stop(grace_s=1.0)


@run_async
async def test_no_load_starts_once_shutdown_began() -> None:
    cold = FakeModel("model-b")
    registry = fake_registry([FakeModel("model-a"), cold])
    await registry.start()
    registry.drain(grace_s=1.0)
    with pytest.raises(Unavailable, match="shutting down") as refused:
        async with registry.lease(registry.get("model-b"), deadline=time.monotonic() + 5):
            pass
    assert refused.value.retry_after is not None and cold.load_attempts == 0
    await registry.stop(grace_s=1.0)
