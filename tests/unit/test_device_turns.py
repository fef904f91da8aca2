"""Device turns: one model at a time per device, models with work waiting take turns."""

from __future__ import annotations

import asyncio
import threading
import time

from diffuser_api.engine import Engine, EngineLimits
from diffuser_api.engine.device_turns import DeviceTurns, device_of
from tests.fakes import FakeRunner, image_job
from tests.unit.test_engine import run_async, wait_until


def test_runner_names_give_their_device():
    assert device_of(FakeRunner("cuda:0#1")) == "cuda:0"
    assert device_of(FakeRunner("cpu")) == "cpu"


def test_a_waiting_owner_gets_the_device_before_the_holder_comes_back():
    turns = DeviceTurns()
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def hold(owner: str) -> None:
        with turns.turn("gpu0", owner):
            order.append(owner)
            holding.set()
            release.wait(5)

    def take(owner: str) -> None:
        with turns.turn("gpu0", owner):
            order.append(owner)

    first = threading.Thread(target=hold, args=("a",))
    first.start()
    holding.wait(5)
    waiting_b = threading.Thread(target=take, args=("b",))
    waiting_b.start()
    time.sleep(0.05)
    waiting_a = threading.Thread(target=take, args=("a",))  # a again, after b asked
    waiting_a.start()
    time.sleep(0.05)
    other_device = threading.Thread(target=lambda: turns.turn("gpu1", "c").__enter__())
    other_device.start()
    other_device.join(1)
    assert not other_device.is_alive(), "another device waited"
    assert order == ["a"]
    release.set()
    for thread in (first, waiting_b, waiting_a):
        thread.join(5)
    assert order == ["a", "b", "a"]


def test_workers_of_the_holder_share_its_turn_while_nobody_else_waits():
    turns = DeviceTurns()
    with turns.turn("gpu0", "a"):
        joined = threading.Thread(target=lambda: turns.turn("gpu0", "a").__enter__())
        joined.start()
        joined.join(1)
        assert not joined.is_alive()


@run_async
async def test_engines_sharing_a_device_alternate_batches_of_one() -> None:
    """a1 runs; a2, a3 queue on A, then b1 on B: B's batch comes next, not A's backlog."""
    turns = DeviceTurns()
    gate = threading.Event()
    runner_a, runner_b = FakeRunner("gpu0#0", gate=gate), FakeRunner("gpu0#0")
    limits = EngineLimits(max_batch_size=1, request_timeout_s=5)
    engines = [Engine([runner_a], limits, turns=turns), Engine([runner_b], limits, turns=turns)]
    for engine in engines:
        engine.start()
    try:
        first = asyncio.create_task(engines[0].submit(image_job("a1")))
        await wait_until(lambda: runner_a.started("a1"), "a1 to run")
        rest_a = [asyncio.create_task(engines[0].submit(image_job(prompt))) for prompt in ("a2", "a3")]
        await asyncio.sleep(0.05)
        b1 = asyncio.create_task(engines[1].submit(image_job("b1")))
        await asyncio.sleep(0.05)
        assert not runner_b.batches, "B ran while A held the device"
        gate.set()
        await asyncio.gather(first, b1, *rest_a)
    finally:
        gate.set()
        for engine in engines:
            await engine.stop(grace_s=2.0)
    batches = sorted(runner_a.batches + runner_b.batches, key=lambda batch: batch.started_at)
    assert [batch.prompts[0] for batch in batches] == ["a1", "b1", "a2", "a3"]
    for earlier, later in zip(batches, batches[1:], strict=False):
        assert earlier.finished_at is not None and earlier.finished_at <= later.started_at
