"""The engine survives its model: a pipeline that raises mid-step, a worker thread that dies,
a request that times out queued. Clients get an answer in our words, every time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

import httpx
import pytest
from fastapi.testclient import TestClient

from diffuser_api.domain import GeneratedImage, ImageJob
from diffuser_api.engine import Engine, EngineLimits, StepCallback
from diffuser_api.engine.engine import MAX_DEATHS_IN_A_ROW
from diffuser_api.errors import DiffuserError, ModelFailure
from tests.fakes import FakeRunner, fake_app, image_job
from tests.servers import ThreadedServer
from tests.unit.test_api import GEN, assert_envelope, assert_still_serves, wait_ready
from tests.unit.test_engine import assert_images_of, block_worker, run_async, serving, submit, wait_until
from tests.unit.test_streaming import sse_events

# What a library's error tends to carry: addresses, paths, internals no client should see.
LIBRARY_WORDS = "CUDA error: an illegal memory access at 0x7f3a2c00 in /opt/venv/lib/python3.12/torch/nn.py"


class WorkerKiller(BaseException):
    """Not an ``Exception``: escapes any ``except Exception`` and ends the worker's thread."""


class FailsMidStep(FakeRunner):
    """Runs ``after_steps`` steps of any batch holding ``prompt``, then raises ``error`` from
    inside the pipeline call, as a model bug surfacing mid-denoising would."""

    def __init__(self, prompt: str, error: BaseException, after_steps: int = 2, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.failing_prompt = prompt
        self.error = error
        self.after_steps = after_steps

    def run(self, jobs: Sequence[ImageJob], on_step: StepCallback) -> list[list[GeneratedImage]]:
        if all(job.prompt != self.failing_prompt for job in jobs):
            return super().run(jobs, on_step)

        def step_then_fail(step: int, total: int, previews) -> None:
            on_step(step, total, previews)
            if step == self.after_steps:
                raise self.error

        return super().run(jobs, step_then_fail)


# A pipeline that raises mid-step


def test_pipeline_raising_mid_step_is_a_500_in_our_words_and_the_log_has_the_details(tmp_path, caplog):
    runner = FailsMidStep("crash", RuntimeError(LIBRARY_WORDS), after_steps=2)
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        with caplog.at_level(logging.WARNING):
            response = client.post(GEN, json={"prompt": "crash", "num_inference_steps": 6})
        error = assert_envelope(response, 500)
        request_id = response.headers["x-request-id"]
        assert error["message"] == f"the model failed while generating (request id {request_id})"
        assert error["type"] == "server_error"
        assert "0x7f" not in response.text and "/opt/venv" not in response.text and "CUDA" not in response.text
        logged = [record for record in caplog.records if request_id in record.getMessage()]
        assert logged and logged[0].exc_info is not None
        assert LIBRARY_WORDS in logging.Formatter().formatException(logged[0].exc_info)
        assert_still_serves(client)
    assert runner.batch_of("crash").steps == 2


def test_pipeline_raising_mid_step_in_a_stream_is_an_error_event_in_our_words(tmp_path):
    runner = FailsMidStep("crash", RuntimeError(LIBRARY_WORDS))
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        payload = {"prompt": "crash", "stream": True, "partial_images": 1, "num_inference_steps": 6}
        with client.stream("POST", GEN, json=payload) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            events = sse_events(response)
        name, body = events[-1]
        assert name == "error"
        assert body["error"]["message"] == f"the model failed while generating (request id {request_id})"
        assert "CUDA" not in str(events)
        assert_still_serves(client)


@run_async
async def test_every_request_of_a_batch_that_raised_mid_step_fails_and_the_next_batch_runs() -> None:
    runner = FailsMidStep("crash", RuntimeError(LIBRARY_WORDS))
    async with serving(runner) as engine:
        blocker = await block_worker(engine, runner)
        batch = [await submit(engine, "crash", steps=4), await submit(engine, "bystander", steps=4)]
        await wait_until(lambda: engine.queue_depth == 2, "two queued requests")
        runner.gate.set()
        await blocker
        for task in batch:
            with pytest.raises(ModelFailure, match="^the model failed while generating$"):
                await task
        assert_images_of(await engine.submit(image_job("next", steps=4)), "next")
    assert runner.batch_of("crash").prompts == ("crash", "bystander")


def test_out_of_memory_that_halving_cannot_help_is_a_500_and_the_server_serves_on(tmp_path):
    """What the message says is models/runner.py's (tests/families checks it holds no allocator
    report); here, that it reaches the client as a 500 with the request id."""
    runner = FakeRunner(max_images=1)
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        response = client.post(GEN, json={"prompt": "two", "n": 2})
        error = assert_envelope(response, 500)
        assert error["type"] == "server_error"
        assert error["message"].endswith(f"(request id {response.headers['x-request-id']})")
        assert_still_serves(client)


# A worker thread that dies


@run_async
async def test_dead_worker_fails_the_jobs_it_held_and_a_replacement_serves_the_queue() -> None:
    runner = FakeRunner(fail_on={"kill": WorkerKiller("the thread ends here")})
    async with serving(runner) as engine:
        original = engine.workers[0]
        blocker = await block_worker(engine, runner)
        held = [await submit(engine, "kill"), await submit(engine, "bystander")]
        queued = await submit(engine, "queued", size=(128, 128))  # another batch, after the killing one
        await wait_until(lambda: engine.queue_depth == 3, "three queued requests")
        runner.gate.set()
        await blocker
        for task in held:
            with pytest.raises(ModelFailure, match="worker stopped unexpectedly") as failed:
                await task
            assert "the thread ends here" not in failed.value.message
        assert_images_of(await queued, "queued")
        await wait_until(lambda: engine.workers[0] is not original, "a replacement worker")
        assert engine.workers[0].alive and not original.alive
        assert engine.health_problem is None
        assert_images_of(await engine.submit(image_job("later")), "later")


@run_async
async def test_worker_killed_after_answering_keeps_the_answer_and_is_replaced() -> None:
    """An error escaping the worker loop outside the pipeline call (here, from a batch observer)."""
    kills = [WorkerKiller("observer broke the loop")]

    def observer(report: object) -> None:
        if kills:
            raise kills.pop()

    runner = FakeRunner()
    engine = Engine([runner], EngineLimits(), observers=[observer])
    engine.start()
    try:
        first = engine.workers[0]
        assert_images_of(await engine.submit(image_job("answered")), "answered")
        await wait_until(lambda: engine.workers[0] is not first, "a replacement worker")
        assert_images_of(await engine.submit(image_job("next")), "next")
    finally:
        await engine.stop(grace_s=2.0)


@run_async
async def test_every_accepted_request_gets_an_answer_whatever_the_model_does() -> None:
    runners = (
        FailsMidStep("crash", RuntimeError(LIBRARY_WORDS), fail_on={"kill": WorkerKiller("x")}, max_images=3,
                     name="cpu#0"),
        FailsMidStep("crash", RuntimeError(LIBRARY_WORDS), fail_on={"kill": WorkerKiller("x")}, max_images=3,
                     name="cpu#1"),
    )
    prompts = ["ok", "crash", "kill", "big", "ok-2"] * 4
    async with serving(*runners, max_batch_size=4) as engine:
        tasks = [
            asyncio.create_task(
                engine.submit(image_job(prompt, steps=3, seeds=(1, 2, 3, 4) if prompt == "big" else (index,)))
            )
            for index, prompt in enumerate(prompts)
        ]
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending, "a request was left hanging"
    outcomes: dict[str, set[str]] = {}
    for prompt, task in zip(prompts, tasks, strict=True):
        error = task.exception()
        assert error is None or isinstance(error, DiffuserError), repr(error)
        outcomes.setdefault(prompt, set()).add("ok" if error is None else type(error).__name__)
    assert outcomes["crash"] == {"ModelFailure"}
    assert outcomes["kill"] == {"ModelFailure"}
    assert "OutOfMemory" not in outcomes["ok"] | outcomes["ok-2"]


def test_workers_dying_again_and_again_turn_health_503_until_a_batch_succeeds(tmp_path):
    runner = FakeRunner(fail_on={"kill": WorkerKiller("x")})
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        for _ in range(MAX_DEATHS_IN_A_ROW):
            assert_envelope(client.post(GEN, json={"prompt": "kill"}), 500)
        health = assert_envelope(client.get("/health"), 503)
        assert "unhealthy" in health["message"]
        assert_still_serves(client)  # a replacement worker still serves
        assert client.get("/health").status_code == 200


# Timeouts through real HTTP: queued (503) versus running (504)


def test_queued_request_past_the_timeout_is_503_with_retry_after_and_a_running_one_504(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    app = fake_app(tmp_path, runner, limits=EngineLimits(request_timeout_s=0.5))
    with ThreadedServer(app) as server:
        server.wait_ready()
        running: dict[str, httpx.Response] = {}

        def post_running() -> None:
            running["response"] = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "running"}, timeout=10)

        thread = threading.Thread(target=post_running)
        thread.start()
        try:
            wait_until_sync(lambda: runner.started("running"), "the worker to start 'running'")
            queued = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "queued", "size": "64x64"}, timeout=10)
            error = assert_envelope(queued, 503)
            assert error["type"] == "server_error" and "without starting" in error["message"]
            assert float(queued.headers["retry-after"]) >= 1
            assert queued.headers.get("x-should-retry") != "false"
            thread.join(10)
            timed_out = running["response"]
            assert_envelope(timed_out, 504, code="timeout")
            assert timed_out.headers["x-should-retry"] == "false"
        finally:
            gate.set()
            thread.join(10)
        assert httpx.post(f"{server.base_url}{GEN}", json={"prompt": "after"}, timeout=10).status_code == 200
    assert not runner.started("queued")


def wait_until_sync(condition, what: str, timeout_s: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)

