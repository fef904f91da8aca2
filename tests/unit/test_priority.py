"""Priority classes with ageing: the real engine and queue with the fake runner.

Requests that must not batch together get different sizes (the fake runner's batch key is
task, size and steps), so the order of the runner's batches is the order the queue served.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import openai
import pytest

from diffuser_api.domain import GeneratedImage
from diffuser_api.engine import Engine, EngineLimits, batching
from diffuser_api.engine.device_turns import DeviceTurns
from diffuser_api.engine.priority import Priority, effective_class
from diffuser_api.errors import Overloaded, Unavailable
from tests.fakes import FakeRunner, fake_app, image_job
from tests.servers import ThreadedServer
from tests.unit.test_engine import block_worker, run_async, serving, wait_until


async def submit_as(
    engine: Engine, prompt: str, priority: Priority, **job: Any
) -> asyncio.Task[list[GeneratedImage]]:
    """Start a request of one class as its own task and let it reach the queue."""
    task = asyncio.create_task(engine.submit(image_job(prompt, **job), priority=priority))
    await asyncio.sleep(0)
    return task


def served_order(runner: FakeRunner) -> list[tuple[str, ...]]:
    return [batch.prompts for batch in runner.batches]


@pytest.mark.parametrize(
    ("priority", "waited_s", "expected"),
    [
        (Priority.INTERACTIVE, 100.0, 0),
        (Priority.JOB, 0.0, 1),
        (Priority.JOB, 29.9, 1),
        (Priority.JOB, 30.0, 0),
        (Priority.BATCH, 0.0, 2),
        (Priority.BATCH, 45.0, 1),
        (Priority.BATCH, 60.0, 0),
        (Priority.BATCH, 6000.0, 0),
    ],
)
def test_a_class_improves_by_one_per_ageing_period_waited(priority: Priority, waited_s: float, expected: int) -> None:
    assert effective_class(priority, waited_s, ageing_s=30.0) == expected


@run_async
async def test_classes_are_served_interactive_then_jobs_then_batch_lines() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [
            await submit_as(engine, "batch-line", Priority.BATCH, size=(64, 64)),
            await submit_as(engine, "job", Priority.JOB, size=(72, 72)),
            await submit_as(engine, "interactive-1", Priority.INTERACTIVE, size=(80, 80)),
            await submit_as(engine, "interactive-2", Priority.INTERACTIVE, size=(88, 88)),
        ]
        runner.gate.set()
        await asyncio.gather(blocker, *tasks)
    assert served_order(runner) == [
        ("blocker",), ("interactive-1",), ("interactive-2",), ("job",), ("batch-line",)
    ]


@pytest.mark.parametrize(("job_waits_s", "first"), [(0.0, "interactive"), (0.3, "job")])
@run_async
async def test_a_job_that_waited_one_ageing_period_goes_before_later_interactive_requests(
    job_waits_s: float, first: str
) -> None:
    runner = FakeRunner()
    async with serving(runner, priority_ageing_s=0.2) as engine:
        blocker = await block_worker(engine, runner)
        job = await submit_as(engine, "job", Priority.JOB, size=(64, 64))
        await asyncio.sleep(job_waits_s)
        interactive = await submit_as(engine, "interactive", Priority.INTERACTIVE, size=(72, 72))
        runner.gate.set()
        await asyncio.gather(blocker, job, interactive)
    assert served_order(runner)[1] == (first,)


@run_async
async def test_batch_lines_are_served_under_endless_interactive_load() -> None:
    """Four clients keep the queue full of interactive requests that cannot batch with the line;
    the line still runs, once it has aged to the interactive class (two ageing periods)."""
    ageing_s = 0.15
    runner = FakeRunner(step_delay_s=0.01)
    stop = asyncio.Event()

    async def client(engine: Engine, name: str) -> int:
        served = 0
        while not stop.is_set():
            await engine.submit(image_job(name, size=(72, 72)), priority=Priority.INTERACTIVE)
            served += 1
        return served

    async with serving(runner, priority_ageing_s=ageing_s, max_batch_size=1) as engine:
        clients = [asyncio.create_task(client(engine, f"client-{index}")) for index in range(4)]
        await wait_until(lambda: engine.waiting(Priority.INTERACTIVE) >= 3, "interactive requests queued")
        submitted = time.monotonic()
        await engine.submit(image_job("batch-line", size=(64, 64)), priority=Priority.BATCH)
        waited = time.monotonic() - submitted
        clients_busy = engine.waiting(Priority.INTERACTIVE)
        stop.set()
        served = await asyncio.gather(*clients)
    assert clients_busy >= 1, "the interactive load had stopped before the line ran"
    assert 2 * ageing_s <= waited < 2 * ageing_s + 1.0
    assert sum(served) >= 8


@run_async
async def test_an_interactive_batch_takes_no_lower_class_work_and_lower_classes_batch_among_themselves(
    monkeypatch,
) -> None:
    """On a CPU a pipeline call costs about its image count: a job filling an interactive batch
    would make the interactive request wait for the job's pixels too. (Background batches are
    not halved here: interactive traffic counts as live for no time.)"""
    monkeypatch.setattr(batching, "INTERACTIVE_LIVE_S", 0.0)
    runner = FakeRunner()
    async with serving(runner, max_batch_size=3) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [
            await submit_as(engine, "job-a", Priority.JOB, size=(64, 64)),
            await submit_as(engine, "line", Priority.BATCH, size=(64, 64)),
            await submit_as(engine, "interactive", Priority.INTERACTIVE, size=(64, 64)),
            await submit_as(engine, "job-b", Priority.JOB, size=(64, 64)),
        ]
        runner.gate.set()
        await asyncio.gather(blocker, *tasks)
    assert served_order(runner) == [("blocker",), ("interactive",), ("job-a", "job-b"), ("line",)]


@run_async
async def test_a_burst_of_50_jobs_delays_an_interactive_request_by_at_most_one_batch(monkeypatch) -> None:
    monkeypatch.setattr(batching, "INTERACTIVE_LIVE_S", 0.0)  # whole job batches before and after
    runner = FakeRunner(step_delay_s=0.01)
    async with serving(runner, max_queue_size=4, max_batch_size=4) as engine:
        jobs = [await submit_as(engine, f"job-{index}", Priority.JOB, size=(64, 64)) for index in range(50)]
        await wait_until(lambda: len(runner.batches) >= 2, "the jobs to start running")
        runner.gate.clear()  # hold the worker inside a job batch, so no batch can start meanwhile
        await asyncio.sleep(0.05)
        begun = len(runner.batches)
        work = image_job("interactive", size=(72, 72))
        interactive = asyncio.create_task(engine.submit(work, priority=Priority.INTERACTIVE))
        await asyncio.sleep(0)
        assert engine.queue_position(work) == 0, "ahead of 40-odd queued jobs"
        runner.gate.set()
        await interactive
        await asyncio.gather(*jobs)
    assert runner.batches.index(runner.batch_of("interactive")) == begun, "a job batch went before it"
    assert len(runner.batches) == 1 + 50 // 4 + 1  # every job ran, four to a batch


@run_async
async def test_background_batches_hold_half_a_batch_while_interactive_traffic_is_live(monkeypatch) -> None:
    """A job batch that starts just before an interactive request arrives delays it by the
    whole batch; while interactive requests keep coming, job batches are half as long."""
    monkeypatch.setattr(batching, "INTERACTIVE_LIVE_S", 0.3)
    runner = FakeRunner()
    async with serving(runner, max_batch_size=4) as engine:
        blocker = await block_worker(engine, runner)  # an interactive request: traffic is live
        during = [await submit_as(engine, f"during-{index}", Priority.JOB, size=(64, 64)) for index in range(8)]
        runner.gate.set()
        await asyncio.gather(blocker, *during)
        await asyncio.sleep(0.35)  # no interactive request since: the jobs fill whole batches again
        runner.gate.clear()
        job_blocker = await submit_as(engine, "job-blocker", Priority.JOB, steps=1)
        await wait_until(lambda: runner.started("job-blocker"), "the worker to start the job blocker")
        after = [await submit_as(engine, f"after-{index}", Priority.JOB, size=(64, 64)) for index in range(8)]
        runner.gate.set()
        await asyncio.gather(job_blocker, *after)
    sizes = [(batch.prompts[0].split("-")[0], len(batch.prompts)) for batch in runner.batches[1:]]
    assert sizes == [("during", 2)] * 4 + [("job", 1)] + [("after", 4)] * 2


@run_async
async def test_only_interactive_requests_count_against_the_queue_bound() -> None:
    runner = FakeRunner()
    async with serving(runner, max_queue_size=2) as engine:
        blocker = await block_worker(engine, runner)
        jobs = [await submit_as(engine, f"job-{index}", Priority.JOB) for index in range(5)]
        lines = [await submit_as(engine, f"line-{index}", Priority.BATCH) for index in range(5)]
        interactive = [await submit_as(engine, f"interactive-{index}", Priority.INTERACTIVE) for index in range(2)]
        assert (engine.waiting(Priority.INTERACTIVE), engine.waiting(Priority.JOB)) == (2, 5)
        assert engine.queue_depth == 12
        with pytest.raises(Overloaded):
            engine.check_room()
        with pytest.raises(Overloaded):
            await engine.submit(image_job("one-too-many"))
        engine.check_room(Priority.JOB)
        late_job = await submit_as(engine, "late-job", Priority.JOB)
        assert engine.waiting(Priority.JOB) == 6
        runner.gate.set()
        await asyncio.gather(blocker, *jobs, *lines, *interactive, late_job)
    assert len(runner.jobs_seen) == 1 + 5 + 5 + 2 + 1


@run_async
async def test_positions_count_what_is_ahead_in_serving_order() -> None:
    runner = FakeRunner()
    async with serving(runner, priority_ageing_s=0.2) as engine:
        blocker = await block_worker(engine, runner)
        prompts = ["aged-job", "batch-line", "job", "interactive-1", "interactive-2"]
        works = {prompt: image_job(prompt, size=(64 + 8 * index, 64)) for index, prompt in enumerate(prompts)}
        classes = [Priority.JOB, Priority.BATCH, Priority.JOB, Priority.INTERACTIVE, Priority.INTERACTIVE]
        tasks = []
        for prompt, priority in zip(prompts, classes, strict=True):
            tasks.append(asyncio.create_task(engine.submit(works[prompt], priority=priority)))
            await asyncio.sleep(0.25 if prompt == "aged-job" else 0)  # aged-job reaches the interactive class
        positions = {prompt: engine.queue_position(work) for prompt, work in works.items()}
        runner.gate.set()
        await asyncio.gather(blocker, *tasks)
    assert positions == {"aged-job": 0, "interactive-1": 1, "interactive-2": 2, "job": 3, "batch-line": 4}
    assert [batch.prompts[0] for batch in runner.batches[1:]] == sorted(works, key=positions.__getitem__)


@run_async
async def test_jobs_wait_past_the_request_timeout_interactive_requests_do_not() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    async with serving(runner, request_timeout_s=0.2) as engine:
        blocker = await submit_as(engine, "blocker", Priority.JOB)  # an interactive one would time out too
        await wait_until(lambda: runner.started("blocker"), "the blocker to run")
        job = await submit_as(engine, "job", Priority.JOB)
        interactive = await submit_as(engine, "interactive", Priority.INTERACTIVE)
        with pytest.raises(Unavailable):
            await interactive
        await asyncio.sleep(0.2)
        assert not job.done()
        runner.gate.set()
        await blocker
        images = await job
    assert [image.seed for image in images] == [1]


@pytest.mark.parametrize(
    ("job_waits_s", "after_holder"), [(0.0, ["interactive", "job"]), (0.3, ["job", "interactive"])]
)
@run_async
async def test_device_turns_go_to_the_best_class_then_to_the_oldest(
    job_waits_s: float, after_holder: list[str]
) -> None:
    """Three models on one device: A holds it; B's job batch waits, then C's interactive one.
    C goes first unless B's job has aged to the interactive class (then B asked first)."""
    turns = DeviceTurns()
    gate = threading.Event()
    runners = {
        "holder": FakeRunner("gpu0#0", gate=gate), "job": FakeRunner("gpu0#0"), "interactive": FakeRunner("gpu0#0")
    }
    limits = EngineLimits(priority_ageing_s=0.2)
    engines = {name: Engine([runner], limits, turns=turns) for name, runner in runners.items()}
    for engine in engines.values():
        engine.start()
    try:
        holder = asyncio.create_task(engines["holder"].submit(image_job("holder")))
        await wait_until(lambda: runners["holder"].started("holder"), "the holder to run")
        job = await submit_as(engines["job"], "job", Priority.JOB)
        await asyncio.sleep(job_waits_s)
        interactive = await submit_as(engines["interactive"], "interactive", Priority.INTERACTIVE)
        await asyncio.sleep(0.05)  # both workers hold their batch and wait for the device
        assert not runners["job"].batches and not runners["interactive"].batches
        gate.set()
        await asyncio.gather(holder, job, interactive)
    finally:
        gate.set()
        for engine in engines.values():
            await engine.stop(grace_s=2.0)
    batches = sorted((batch for runner in runners.values() for batch in runner.batches), key=lambda b: b.started_at)
    assert [batch.prompts[0] for batch in batches] == ["holder", *after_holder]


@pytest.mark.slow
def test_over_http_a_burst_of_jobs_neither_fills_the_queue_nor_delays_a_client_by_more_than_a_batch(tmp_path):
    """The real server with the OpenAI SDK: 50 jobs wait in a queue bounded at 2 interactive
    requests, and a client's request is answered 200 right after the batch it found running."""
    runner = FakeRunner(step_delay_s=0.005)
    app = fake_app(tmp_path, runner, limits=EngineLimits(max_queue_size=2, max_batch_size=4, request_timeout_s=10))
    with ThreadedServer(app) as server:
        server.wait_ready()
        engine = app.state.registry.get("fake-model").engine_now

        async def burst() -> list[list[GeneratedImage]]:
            works = [image_job(f"job-{index}", size=(64, 64)) for index in range(50)]
            return await asyncio.gather(*(engine.submit(work, priority=Priority.JOB) for work in works))

        jobs: list[list[list[GeneratedImage]]] = []
        jobs_thread = threading.Thread(target=lambda: jobs.append(asyncio.run(burst())))
        jobs_thread.start()
        deadline = time.monotonic() + 5
        while len(runner.batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        runner.gate.clear()  # hold the worker inside a job batch while the client's request arrives
        time.sleep(0.05)
        begun = len(runner.batches)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        answers: list[Any] = []
        client_thread = threading.Thread(
            target=lambda: answers.append(client.images.generate(prompt="interactive", size="32x32"))  # type: ignore[arg-type]
        )
        client_thread.start()
        while engine.waiting(Priority.INTERACTIVE) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.waiting(Priority.JOB) > 40
        runner.gate.set()
        client_thread.join(10)
        jobs_thread.join(10)
    assert len(answers[0].data) == 1
    assert runner.batches.index(runner.batch_of("interactive")) == begun
    assert len(jobs[0]) == 50
