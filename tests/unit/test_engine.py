"""The engine with a fake runner: batching, back-pressure, cancellation, timeouts, failures, stop.

Every wait is bounded (``wait_until``, the runner's gate timeout, ``TEST_TIMEOUT_S`` per test),
so an engine bug fails a test instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
from PIL.Image import Image

from diffuser_api.domain import EncodedPreview, GeneratedImage, ImageJob, StepProgress, Task
from diffuser_api.engine import Engine, EngineLimits, worker
from diffuser_api.engine.job import WorkerEncoders
from diffuser_api.errors import InvalidRequest, ModelFailure, OutOfMemory, Overloaded, RequestTimeout, Unavailable
from tests.fakes import FakeRunner, colour_of, image_job

TEST_TIMEOUT_S = 10.0


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh loop, bounded in time (the project has no pytest-asyncio);
    its parameters (``parametrize``) pass through."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), TEST_TIMEOUT_S))

    return wrapper


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def serving(*runners: FakeRunner, **limits: Any) -> AsyncIterator[Engine]:
    engine = Engine(runners, EngineLimits(**limits))
    engine.start()
    try:
        yield engine
    finally:
        for runner in runners:
            runner.gate.set()
        await engine.stop(grace_s=2.0)


async def submit(engine: Engine, prompt: str, **job: Any) -> asyncio.Task[list[GeneratedImage]]:
    """Start a request as its own task (like one HTTP client) and let it reach the queue."""
    task = asyncio.create_task(engine.submit(image_job(prompt, **job)))
    await asyncio.sleep(0)
    return task


async def block_worker(engine: Engine, runner: FakeRunner) -> asyncio.Task[list[GeneratedImage]]:
    """Occupy the runner's worker with a one-step job that waits until ``runner.gate`` opens."""
    runner.gate.clear()
    blocker = await submit(engine, "blocker", steps=1)
    await wait_until(lambda: runner.started("blocker"), "the worker to start the blocker")
    return blocker


def assert_images_of(images: list[GeneratedImage], prompt: str, seeds: tuple[int, ...] = (1,)) -> None:
    assert [image.seed for image in images] == list(seeds)
    assert [image.image.getpixel((0, 0)) for image in images] == [colour_of(prompt, seed) for seed in seeds]


@run_async
async def test_single_job_returns_one_image_per_seed() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        images = await engine.submit(image_job("a fox", seeds=(7, 8, 9), size=(96, 64)))
    assert_images_of(images, "a fox", (7, 8, 9))
    assert {image.image.size for image in images} == {(96, 64)}
    assert [batch.images for batch in runner.batches] == [3]


@run_async
async def test_jobs_queued_behind_a_busy_worker_run_in_one_call() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [await submit(engine, prompt) for prompt in ("red", "green", "blue")]
        await wait_until(lambda: engine.queue_depth == 3, "three queued jobs")
        runner.gate.set()
        results = await asyncio.gather(blocker, *tasks)
    assert [batch.prompts for batch in runner.batches] == [("blocker",), ("red", "green", "blue")]
    for prompt, images in zip(("red", "green", "blue"), results[1:], strict=True):
        assert_images_of(images, prompt)


@run_async
async def test_lone_client_starts_at_once_and_overlapping_clients_wait_to_batch() -> None:
    runner = FakeRunner()
    async with serving(runner, batch_wait_s=0.5) as engine:
        await engine.submit(image_job("first"))
        started = time.monotonic()
        assert_images_of(await engine.submit(image_job("alone")), "alone")
        assert time.monotonic() - started < 0.25, "a lone request waited for company"
        blocker = await block_worker(engine, runner)
        during = [await submit(engine, prompt) for prompt in ("during-1", "during-2")]
        runner.gate.set()
        await asyncio.gather(blocker, *during)
        early = await submit(engine, "early")
        await asyncio.sleep(0.05)
        late = await submit(engine, "late")
        await asyncio.gather(early, late)
    assert runner.batch_of("early").prompts == ("early", "late")


@run_async
async def test_a_batch_filled_from_the_queue_starts_without_waiting_for_more() -> None:
    runner = FakeRunner()
    async with serving(runner, batch_wait_s=5.0, max_batch_size=2) as engine:
        started = time.monotonic()
        await asyncio.gather(engine.submit(image_job("one")), engine.submit(image_job("two")))
        assert time.monotonic() - started < 2.5, "a full batch waited out batch_wait_s"
    assert runner.batch_of("one").prompts == ("one", "two")


@run_async
async def test_jobs_of_different_size_or_steps_are_not_merged() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [
            await submit(engine, "a"),
            await submit(engine, "wide", size=(128, 64)),
            await submit(engine, "longer", steps=3),
            await submit(engine, "b"),
        ]
        await wait_until(lambda: engine.queue_depth == 4, "four queued jobs")
        runner.gate.set()
        await asyncio.gather(blocker, *tasks)
    assert [batch.prompts for batch in runner.batches[1:]] == [("a", "b"), ("wide",), ("longer",)]


@run_async
async def test_max_batch_size_counts_every_image_of_a_job() -> None:
    runner = FakeRunner()
    async with serving(runner, max_batch_size=4) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [
            await submit(engine, "three", seeds=(1, 2, 3)),
            await submit(engine, "two", seeds=(1, 2)),
            await submit(engine, "one"),
            await submit(engine, "another"),
        ]
        await wait_until(lambda: engine.queue_depth == 4, "four queued jobs")
        runner.gate.set()
        await asyncio.gather(blocker, *tasks)
    assert [batch.prompts for batch in runner.batches[1:]] == [("three", "one"), ("two", "another")]
    assert [batch.images for batch in runner.batches[1:]] == [4, 3]


@run_async
async def test_max_batch_pixels_caps_a_batch() -> None:
    runner = FakeRunner()
    async with serving(runner, max_batch_pixels=2 * 64 * 64) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [await submit(engine, prompt) for prompt in ("p1", "p2", "p3")]
        await wait_until(lambda: engine.queue_depth == 3, "three queued jobs")
        runner.gate.set()
        await asyncio.gather(blocker, *tasks)
    assert [batch.prompts for batch in runner.batches[1:]] == [("p1", "p2"), ("p3",)]


@run_async
async def test_seeded_images_are_the_same_alone_or_batched() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        alone = await engine.submit(image_job("cat", seeds=(3, 4)))
        blocker = await block_worker(engine, runner)
        tasks = [
            await submit(engine, "dog", seeds=(3,)),
            await submit(engine, "cat", seeds=(3, 4)),
            await submit(engine, "cow", seeds=(4,)),
        ]
        await wait_until(lambda: engine.queue_depth == 3, "three queued jobs")
        runner.gate.set()
        _, dog, batched, cow = await asyncio.gather(blocker, *tasks)
    assert runner.batches[-1].prompts == ("dog", "cat", "cow")
    assert [image.seed for image in batched] == [image.seed for image in alone]
    assert [image.image.tobytes() for image in batched] == [image.image.tobytes() for image in alone]
    assert_images_of(dog, "dog", (3,))
    assert_images_of(cow, "cow", (4,))


@run_async
async def test_full_queue_answers_overloaded_at_once_and_serves_again_later() -> None:
    runner = FakeRunner()
    async with serving(runner, max_queue_size=2) as engine:
        blocker = await block_worker(engine, runner)
        queued = [await submit(engine, "first"), await submit(engine, "second")]
        await wait_until(lambda: engine.queue_depth == 2, "a full queue")
        started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await engine.submit(image_job("third"))
        assert time.monotonic() - started < 0.1
        assert refused.value.retry_after >= 1
        runner.gate.set()
        await asyncio.gather(blocker, *queued)
        assert_images_of(await engine.submit(image_job("later")), "later")


@pytest.mark.parametrize(
    ("seeds", "max_batch_size"),
    [pytest.param((1,), 8, id="one-job"), pytest.param((1, 2, 3), 1, id="split-request-every-chunk")],
)
@run_async
async def test_cancelled_queued_job_never_runs(seeds: tuple[int, ...], max_batch_size: int) -> None:
    runner = FakeRunner()
    async with serving(runner, max_batch_size=max_batch_size) as engine:
        blocker = await block_worker(engine, runner)
        gone = await submit(engine, "never", seeds=seeds)
        await wait_until(lambda: engine.queue_depth == 1, "the job to be queued")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert engine.queue_depth == 0
        runner.gate.set()
        await blocker
        assert_images_of(await engine.submit(image_job("after")), "after")
    assert not runner.started("never")


@run_async
async def test_cancelling_the_only_client_stops_its_batch_at_the_next_step() -> None:
    runner = FakeRunner(step_delay_s=0.01)
    async with serving(runner) as engine:
        gone = await submit(engine, "long", steps=500)
        await wait_until(lambda: runner.started("long") and runner.batch_of("long").steps >= 2, "two steps")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        steps_at_cancel = runner.batch_of("long").steps
        started = time.monotonic()
        assert_images_of(await engine.submit(image_job("next")), "next")
        assert time.monotonic() - started < 0.5
    assert runner.batch_of("long").steps - steps_at_cancel <= 1


@run_async
async def test_cancelling_one_client_of_a_shared_batch_lets_the_other_finish() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        leaver = await submit(engine, "leaver", steps=20)
        stayer = await submit(engine, "stayer", steps=20)
        await wait_until(lambda: engine.queue_depth == 2, "two queued jobs")
        runner.step_delay_s = 0.01
        runner.gate.set()
        await wait_until(lambda: runner.started("stayer") and runner.batch_of("stayer").steps >= 2, "two steps")
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        assert_images_of(await stayer, "stayer")
        await blocker
    shared = runner.batch_of("stayer")
    assert shared.prompts == ("leaver", "stayer")
    assert shared.steps == 20


@run_async
async def test_slow_request_times_out_and_frees_the_worker() -> None:
    runner = FakeRunner(step_delay_s=0.01)
    async with serving(runner, request_timeout_s=0.1) as engine:
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as timed_out:
            await engine.submit(image_job("slow", steps=300))
        assert time.monotonic() - started < 0.5
        assert timed_out.value.code == "timeout"
        assert_images_of(await engine.submit(image_job("quick")), "quick")
    assert runner.batch_of("slow").steps < 300


@run_async
async def test_runner_exception_fails_its_batch_as_model_failure_and_the_next_job_succeeds() -> None:
    runner = FakeRunner(fail_on={"boom": RuntimeError("kaput")})
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        failing = [await submit(engine, "boom"), await submit(engine, "bystander")]
        await wait_until(lambda: engine.queue_depth == 2, "two queued jobs")
        runner.gate.set()
        await blocker
        for task in failing:
            with pytest.raises(ModelFailure) as failed:
                await task
            # The client hears it failed, in our words; the library's words stay in the log.
            assert failed.value.message == "the model failed while generating"
            assert isinstance(failed.value.__cause__, RuntimeError)
        assert_images_of(await engine.submit(image_job("fine")), "fine")
    assert runner.batch_of("boom").prompts == ("boom", "bystander")


@run_async
async def test_diffuser_error_from_the_runner_reaches_the_client_as_it_is() -> None:
    error = InvalidRequest("this model has no such adapter", param="prompt")
    runner = FakeRunner(fail_on={"adapter": error})
    async with serving(runner) as engine:
        with pytest.raises(InvalidRequest) as raised:
            await engine.submit(image_job("adapter"))
        assert raised.value is error
        assert_images_of(await engine.submit(image_job("fine")), "fine")


@run_async
async def test_out_of_memory_batch_is_retried_in_halves() -> None:
    runner = FakeRunner(max_images=2)
    prompts = ("m1", "m2", "m3", "m4")
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        tasks = [await submit(engine, prompt) for prompt in prompts]
        await wait_until(lambda: engine.queue_depth == 4, "four queued jobs")
        runner.gate.set()
        results = await asyncio.gather(blocker, *tasks)
    assert [batch.prompts for batch in runner.batches[1:]] == [prompts, prompts[:2], prompts[2:]]
    for prompt, images in zip(prompts, results[1:], strict=True):
        assert_images_of(images, prompt)


@run_async
async def test_single_job_that_does_not_fit_fails_with_out_of_memory() -> None:
    runner = FakeRunner(max_images=2)
    async with serving(runner) as engine:
        with pytest.raises(OutOfMemory):
            await engine.submit(image_job("huge", seeds=(1, 2, 3)))
        assert_images_of(await engine.submit(image_job("fits", seeds=(1, 2))), "fits", (1, 2))
    assert [batch.prompts for batch in runner.batches] == [("huge",), ("fits",)]


@run_async
async def test_two_devices_run_incompatible_jobs_concurrently() -> None:
    devices = FakeRunner("cpu", step_delay_s=0.05), FakeRunner("cpu", step_delay_s=0.05)
    async with serving(*devices) as engine:
        small = await submit(engine, "small", steps=4)
        large = await submit(engine, "large", size=(128, 128), steps=4)
        assert_images_of(await small, "small")
        assert_images_of(await large, "large")
    assert [len(device.batches) for device in devices] == [1, 1]
    batches = [device.batches[0] for device in devices]
    assert max(batch.started_at for batch in batches) < min(batch.finished_at or 0.0 for batch in batches)


@run_async
async def test_idle_worker_takes_a_job_that_arrives_while_another_gathers_a_batch() -> None:
    """A new job must wake the idle worker, not only one gathering a batch the job cannot join."""
    devices = FakeRunner("cpu"), FakeRunner("cpu")
    for device in devices:
        device.gate.clear()
    async with serving(*devices, batch_wait_s=0.3) as engine:
        quick = await submit(engine, "quick", steps=1)
        await wait_until(lambda: any(device.started("quick") for device in devices), "a worker to take 'quick'")
        free, gathering = devices if devices[0].started("quick") else devices[::-1]
        held = await submit(engine, "held", size=(128, 128))
        await wait_until(lambda: engine.queue_depth == 0, "the other worker to take 'held'")
        free.gate.set()
        await quick
        await asyncio.sleep(0.02)  # the free worker is back waiting; the other still gathers
        late = await submit(engine, "late", size=(96, 96))
        await wait_until(lambda: free.started("late"), "the idle worker to take 'late'", timeout=1.0)
        gathering.gate.set()
        await asyncio.gather(held, late)


@run_async
async def test_stop_fails_queued_jobs_at_once_and_refuses_new_ones() -> None:
    runner = FakeRunner()
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        queued = [await submit(engine, "first"), await submit(engine, "second")]
        await wait_until(lambda: engine.queue_depth == 2, "two queued jobs")
        stopping = asyncio.create_task(engine.stop(grace_s=1.0))
        started = time.monotonic()
        for task in queued:
            with pytest.raises(Unavailable, match="had not started") as refused:
                await task
            assert refused.value.retry_after is not None
        assert time.monotonic() - started < 0.2, "queued requests waited for the grace period"
        with pytest.raises(Unavailable):
            await engine.submit(image_job("too late"))
        runner.gate.set()  # the running request finishes within the grace
        assert_images_of(await blocker, "blocker")
        await stopping
    assert not runner.started("first")


@run_async
async def test_stop_fails_work_still_running_when_the_grace_ends_and_stops_its_batch() -> None:
    runner = FakeRunner(step_delay_s=0.01)
    async with serving(runner) as engine:
        running = await submit(engine, "long", steps=1000)
        await wait_until(lambda: runner.started("long"), "the long job to start")
        started = time.monotonic()
        await engine.stop(grace_s=0.2)
        assert time.monotonic() - started < 0.35
        with pytest.raises(Unavailable, match="shut down before this request finished"):
            await running
        await wait_until(lambda: runner.batch_of("long").finished_at is not None, "the batch to stop")
    assert runner.batch_of("long").steps < 1000


@run_async
async def test_stop_gives_all_workers_one_grace_period_together() -> None:
    devices = FakeRunner("cpu"), FakeRunner("cpu")
    for device in devices:
        device.gate.clear()
    async with serving(*devices) as engine:
        busy = [await submit(engine, "small"), await submit(engine, "large", size=(128, 128))]
        await wait_until(lambda: all(device.batches for device in devices), "both workers to be busy")
        started = time.monotonic()
        await engine.stop(grace_s=0.2)
        assert time.monotonic() - started < 0.35
        for device in devices:
            device.gate.set()
        for task in busy:
            with pytest.raises(Unavailable):
                await task


# A request larger than one batch: several batches, one answer.


def assert_within_budget(runner: FakeRunner, max_images: int, max_pixels: int) -> None:
    for batch in runner.batches:
        assert batch.images <= max_images
        assert sum(job.pixels for job in batch.jobs) <= max_pixels


@run_async
async def test_request_over_max_batch_size_runs_as_several_batches_in_seed_order() -> None:
    runner = FakeRunner()
    async with serving(runner, max_batch_size=2) as engine:
        images = await engine.submit(image_job("many", seeds=(10, 11, 12, 13, 14)))
    assert_images_of(images, "many", (10, 11, 12, 13, 14))
    assert [batch.images for batch in runner.batches] == [2, 2, 1]
    assert [job.seeds for job in runner.jobs_seen] == [(10, 11), (12, 13), (14,)]
    assert_within_budget(runner, 2, EngineLimits().max_batch_pixels)


@run_async
async def test_request_over_max_batch_pixels_runs_as_several_batches() -> None:
    runner = FakeRunner()
    budget = 2 * 64 * 64
    async with serving(runner, max_batch_pixels=budget) as engine:
        images = await engine.submit(image_job("wide", seeds=(1, 2, 3)))
    assert_images_of(images, "wide", (1, 2, 3))
    assert [batch.images for batch in runner.batches] == [2, 1]
    assert_within_budget(runner, 8, budget)


@run_async
async def test_single_image_over_max_batch_pixels_runs_alone() -> None:
    runner = FakeRunner()
    async with serving(runner, max_batch_pixels=64 * 64) as engine:
        blocker = await block_worker(engine, runner)
        big = await submit(engine, "big", seeds=(1, 2), size=(128, 128))
        small = await submit(engine, "small", size=(128, 128))
        await wait_until(lambda: engine.queue_depth == 2, "two queued requests")
        runner.gate.set()
        _, big_images, small_images = await asyncio.gather(blocker, big, small)
    assert_images_of(big_images, "big", (1, 2))
    assert_images_of(small_images, "small")
    assert [batch.images for batch in runner.batches[1:]] == [1, 1, 1]


@run_async
async def test_split_request_counts_once_in_the_queue_and_its_position_is_reported() -> None:
    runner = FakeRunner()
    async with serving(runner, max_batch_size=1, max_queue_size=2) as engine:
        blocker = await block_worker(engine, runner)
        work = image_job("split", seeds=(1, 2, 3))
        split = asyncio.create_task(engine.submit(work))
        await wait_until(lambda: engine.queue_depth == 1, "the split request to be queued")
        assert engine.queue_position(work) == 0
        behind = image_job("behind")
        later = asyncio.create_task(engine.submit(behind))
        await wait_until(lambda: engine.queue_position(behind) == 1, "one request ahead of 'behind'")
        with pytest.raises(Overloaded):
            await engine.submit(image_job("third"))
        runner.gate.set()
        _, images, _ = await asyncio.gather(blocker, split, later)
    assert_images_of(images, "split", (1, 2, 3))


@run_async
async def test_a_failing_chunk_fails_the_request_and_its_other_chunks_never_run() -> None:
    runner = FakeRunner(max_images=1)  # runs the first chunk of 1, fails the second (2 images)
    async with serving(runner, max_batch_size=2) as engine:
        blocker = await block_worker(engine, runner)
        doomed = await submit(engine, "doomed", seeds=(1, 2, 3, 4, 5))
        await wait_until(lambda: engine.queue_depth == 1, "the split request to be queued")
        runner.gate.set()
        await blocker
        with pytest.raises(OutOfMemory):
            await doomed
        assert engine.queue_depth == 0
        assert_images_of(await engine.submit(image_job("after")), "after")
    assert [batch.images for batch in runner.batches if "doomed" in batch.prompts] == [2]


@run_async
async def test_split_request_reports_one_rising_step_count_and_previews_at_their_image_index() -> None:
    runner = FakeRunner()
    reports: list[StepProgress] = []
    async with serving(runner, max_batch_size=2) as engine:
        work = ImageJob(task=Task.GENERATION, prompt="p", width=64, height=64, steps=4, seeds=(1, 2, 3),
                        partial_images=1)
        images = await engine.submit(work, progress=reports.append)
        await asyncio.sleep(0.01)  # progress posted just before the result
    assert_images_of(images, "p", (1, 2, 3))
    assert [report.step for report in reports] == list(range(1, 9))
    assert {report.total for report in reports} == {8}
    previews = [(report.first_image, len(report.previews)) for report in reports if report.previews]
    assert previews == [(0, 2), (2, 1)]


@run_async
async def test_previews_are_encoded_on_the_worker_thread_by_the_job_s_encoder() -> None:
    runner = FakeRunner()
    threads: list[str] = []

    def encode(image: Image) -> EncodedPreview:
        threads.append(threading.current_thread().name)
        return EncodedPreview(f"{image.getpixel((0, 0))}")

    reports: list[StepProgress] = []
    async with serving(runner) as engine:
        work = ImageJob(task=Task.GENERATION, prompt="p", width=64, height=64, steps=4, seeds=(1, 2),
                        partial_images=2)
        images = await engine.submit(work, progress=reports.append,
                                     encoders=WorkerEncoders(result=lambda image: b"", preview=encode))
        await asyncio.sleep(0.01)  # progress posted just before the result
        plain: list[StepProgress] = []
        await engine.submit(work, progress=plain.append)
        await asyncio.sleep(0.01)
    assert_images_of(images, "p", (1, 2))
    shown = [preview for report in reports if report.previews for preview in report.previews]
    assert len(shown) == 4 and all(isinstance(preview, EncodedPreview) for preview in shown)
    assert set(threads) == {f"worker-{runner.name}"}, "encoded between steps, on the pipeline's own thread"
    unencoded = [preview for report in plain if report.previews for preview in report.previews]
    assert len(unencoded) == 4 and all(isinstance(preview, Image) for preview in unencoded)


@run_async
async def test_a_preview_encoder_that_fails_leaves_the_image_and_the_request_succeeds() -> None:
    def broken(image: Image) -> EncodedPreview:
        raise OSError("encoder failed")

    reports: list[StepProgress] = []
    async with serving(FakeRunner()) as engine:
        work = ImageJob(task=Task.GENERATION, prompt="p", width=64, height=64, steps=4, seeds=(1,),
                        partial_images=1)
        images = await engine.submit(work, progress=reports.append,
                                     encoders=WorkerEncoders(result=lambda image: b"", preview=broken))
        await asyncio.sleep(0.01)
    assert_images_of(images, "p", (1,))
    shown = [preview for report in reports if report.previews for preview in report.previews]
    assert len(shown) == 1 and isinstance(shown[0], Image)


@run_async
async def test_a_batch_s_images_are_encoded_at_once_on_the_worker_s_encoding_threads(monkeypatch) -> None:
    monkeypatch.setattr(worker, "USABLE_CORES", 2)
    runner = FakeRunner()
    threads: list[str] = []
    both_at_once = threading.Barrier(2, timeout=2.0)  # broken (and the images unencoded) unless concurrent

    def encode(image: GeneratedImage) -> bytes:
        threads.append(threading.current_thread().name)
        both_at_once.wait()
        return f"seed {image.seed}".encode()

    async with serving(runner) as engine:
        encoded = await engine.submit(image_job("p", seeds=(1, 2)), encoders=WorkerEncoders(result=encode))
        plain = await engine.submit(image_job("p", seeds=(1, 2)))
    assert_images_of(encoded, "p", (1, 2))
    assert [image.encoded for image in encoded] == [b"seed 1", b"seed 2"]
    assert all(name.startswith(f"encode-{runner.name}") for name in threads), threads
    assert [image.encoded for image in plain] == [None, None]
    assert [worker.encoding_threads(workers) for workers in (1, 2, 3)] == [2, 1, 1]  # workers sharing the cores
    # Without a preview encoder, previews stay images (the async jobs' case: encoded if watched).
    reports: list[StepProgress] = []
    async with serving(FakeRunner()) as engine:
        work = ImageJob(task=Task.GENERATION, prompt="p", width=64, height=64, steps=4, seeds=(1,), partial_images=1)
        await engine.submit(work, progress=reports.append, encoders=WorkerEncoders(result=lambda image: b""))
        await asyncio.sleep(0.01)
    shown = [preview for report in reports if report.previews for preview in report.previews]
    assert len(shown) == 1 and isinstance(shown[0], Image)


@run_async
async def test_the_next_batch_starts_after_the_last_one_s_images_are_encoded() -> None:
    runner = FakeRunner()
    encoded_at: list[float] = []

    def slow(image: GeneratedImage) -> bytes:
        time.sleep(0.2)
        encoded_at.append(time.monotonic())
        return b"png"

    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        first = asyncio.create_task(engine.submit(image_job("first"), encoders=WorkerEncoders(result=slow)))
        await wait_until(lambda: engine.queue_depth == 1, "the first request queued")
        runner.gate.set()
        await blocker
        await wait_until(lambda: runner.started("first"), "the first request's batch")
        second = await submit(engine, "second")
        await asyncio.gather(first, second)
    assert encoded_at and runner.batch_of("second").started_at > max(encoded_at)


@run_async
async def test_a_batch_s_compute_time_is_its_pipeline_call_without_the_encoding() -> None:
    def slow(image: GeneratedImage) -> bytes:
        time.sleep(0.3)
        return b"png"

    reports = []
    engine = Engine([FakeRunner()], EngineLimits(), observers=[reports.append])
    engine.start()
    try:
        images = await engine.submit(image_job("p"), encoders=WorkerEncoders(result=slow))
    finally:
        await engine.stop(grace_s=2.0)
    assert images[0].encoded == b"png"
    assert len(reports) == 1 and reports[0].compute_s < 0.3


@run_async
async def test_an_image_encoder_that_fails_leaves_the_images_to_the_request_which_succeeds() -> None:
    def broken(image: GeneratedImage) -> bytes:
        raise OSError("encoder failed")

    async with serving(FakeRunner()) as engine:
        images = await engine.submit(image_job("p", seeds=(1, 2)), encoders=WorkerEncoders(result=broken))
    assert_images_of(images, "p", (1, 2))
    assert [image.encoded for image in images] == [None, None]


@run_async
async def test_split_request_past_its_deadline_after_a_chunk_ran_is_a_timeout() -> None:
    runner = FakeRunner(step_delay_s=0.02)
    async with serving(runner, max_batch_size=1, request_timeout_s=0.3) as engine:
        with pytest.raises(RequestTimeout):
            await engine.submit(image_job("slow", seeds=(1, 2, 3, 4), steps=5))
        assert engine.queue_depth == 0
        assert_images_of(await engine.submit(image_job("quick")), "quick")


# Timeouts: never started (503, retry) versus ran too long (504, do not).


@run_async
async def test_request_that_times_out_still_queued_is_unavailable_with_retry_after() -> None:
    runner = FakeRunner()
    async with serving(runner, request_timeout_s=0.2) as engine:
        runner.gate.clear()
        running = await submit(engine, "running", steps=1)
        await wait_until(lambda: runner.started("running"), "the worker to start 'running'")
        queued = await submit(engine, "queued")
        with pytest.raises(Unavailable) as busy:
            await queued
        assert busy.value.retry_after is not None and busy.value.retry_after >= 1
        assert "without starting" in busy.value.message
        with pytest.raises(RequestTimeout):
            await running
        runner.gate.set()
        assert_images_of(await engine.submit(image_job("after")), "after")
    assert not runner.started("queued")
