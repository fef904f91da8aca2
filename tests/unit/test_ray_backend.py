"""The Ray backend seen through the API with no Ray cluster: the ingress's registry and
``RemoteEngine`` over a fake deployment handle that answers as a replica would (wire messages),
or fails as Ray does. The real cluster is in tests/scale_out."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffuser_api.api.app import create_app
from diffuser_api.domain import GeneratedImage, StepProgress, Task
from diffuser_api.engine.job import JobTiming
from diffuser_api.engine.priority import Priority
from diffuser_api.errors import Overloaded
from diffuser_api.models.spec import ServingPlan
from diffuser_api.ray_serve import wire
from diffuser_api.ray_serve.registry import RayModelRegistry, ReplicaCounts
from tests.fakes import FakeModel, FakeRunner, fake_settings, image_job

pytest.importorskip("ray.serve")
from ray.exceptions import ActorDiedError  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402

from diffuser_api.ray_serve.remote import RemoteEngine  # noqa: E402

ONE_RUNNING = ReplicaCounts(running=1)
ENVELOPE_KEYS = {"message", "type", "param", "code", "request_id"}
Replica = Callable[[wire.Message], AsyncIterator[wire.Message]]


async def healthy_replica(message: wire.Message) -> AsyncIterator[wire.Message]:
    job = wire.job_from_wire(message)
    yield {"queued": 0}
    for step in range(1, job.steps + 1):
        yield {"progress": wire.progress_to_wire(StepProgress(step, job.steps))}
    images = [GeneratedImage(Image.new("RGB", (job.width, job.height), (9, 99, 199)), seed) for seed in job.seeds]
    batch = {"worker": "cpu", "size": job.n, "queue_wait_s": [0.0], "compute_s": 0.1, "steps": job.steps,
             "outcome": "ok"}
    yield {"images": wire.images_to_wire(images), "timing": wire.timing_to_wire(JobTiming(0.0, 0.1)),
           "batches": [batch]}


@dataclass
class FakeReplies:
    replies: AsyncIterator[wire.Message]
    cancelled: bool = False

    def __aiter__(self) -> AsyncIterator[wire.Message]:
        return self.replies

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeHandle:
    """A DeploymentHandle whose next calls are answered by ``replicas`` in turn (then healthy)."""

    replicas: list[Replica] = field(default_factory=list)
    calls: list[FakeReplies] = field(default_factory=list)

    def options(self, **options: Any) -> FakeHandle:
        assert options == {"stream": True, "method_name": "run"}
        return self

    def remote(self, message: wire.Message) -> FakeReplies:
        replica = self.replicas.pop(0) if self.replicas else healthy_replica
        self.calls.append(FakeReplies(replica(message)))
        return self.calls[-1]


def failing(error: Exception) -> Replica:
    async def replica(message: wire.Message) -> AsyncIterator[wire.Message]:
        raise error
        yield {}  # an async generator, as Ray's streaming calls are

    return replica


def ray_app(tmp_path, handle: FakeHandle, counts: ReplicaCounts = ONE_RUNNING):
    model = FakeModel("fake-model", FakeRunner(), pinned=True)
    registry = RayModelRegistry(
        ServingPlan(models=(model.spec,), default=model.id),
        probe=lambda spec: model.probe(),
        connect=lambda spec, observers: RemoteEngine(handle, spec.id, 30.0, observers),
        replica_counts=lambda: {model.id: counts},
        scale=lambda spec, up: None,
    )
    return create_app(fake_settings(tmp_path), registry)


def generate(client: TestClient, **body: Any):
    return client.post("/v1/images/generations", json={"prompt": "fox", "size": "32x32", **body})


def assert_ok(response) -> None:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (9, 99, 199)


def test_a_generation_runs_on_the_replica_and_its_batches_reach_the_ingress_metrics(tmp_path):
    with TestClient(ray_app(tmp_path, FakeHandle())) as client:
        assert client.get("/v1/models/fake-model").json()["status"] == "ready"
        assert_ok(generate(client))
        metrics = client.get("/metrics").text
    assert 'diffuser_batches_total{model="fake-model",outcome="ok"} 1.0' in metrics


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (BackPressureError(num_queued_requests=4, max_queued_requests=4), 429, "rate_limit_exceeded"),
        (ActorDiedError(), 503, "server_error"),
    ],
)
def test_ray_failures_are_our_envelope_with_retry_after_and_the_next_request_is_served(tmp_path, error, status,
                                                                                          kind):
    handle = FakeHandle([failing(error)])
    with TestClient(ray_app(tmp_path, handle)) as client:
        response = generate(client)
        assert response.status_code == status
        assert float(response.headers["retry-after"]) >= 1
        envelope = response.json()["error"]
        assert set(envelope) == ENVELOPE_KEYS and envelope["request_id"] == response.headers["x-request-id"]
        assert envelope["type"] == kind or envelope["code"] == kind
        assert "Ray" not in envelope["message"] and "0x" not in envelope["message"]
        assert_ok(generate(client))


def test_a_replica_error_keeps_its_kind(tmp_path):
    async def full_engine(message: wire.Message) -> AsyncIterator[wire.Message]:
        error = Overloaded("the queue is full (64 requests waiting); retry later", retry_after=7.0)
        yield {"error": wire.error_to_wire(error), "timing": wire.timing_to_wire(JobTiming()), "batches": []}

    with TestClient(ray_app(tmp_path, FakeHandle([full_engine]))) as client:
        response = generate(client)
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
        assert response.json()["error"]["message"] == "the queue is full (64 requests waiting); retry later"
        assert_ok(generate(client))


def test_a_model_without_replicas_is_listed_unloaded(tmp_path):
    with TestClient(ray_app(tmp_path, FakeHandle(), ReplicaCounts())) as client:
        assert client.get("/v1/models/fake-model").json()["status"] == "unloaded"
        assert client.get("/health").status_code == 503


def test_a_caller_that_leaves_cancels_the_replica_call():
    async def slow_replica(message: wire.Message) -> AsyncIterator[wire.Message]:
        yield {"progress": wire.progress_to_wire(StepProgress(1, 100))}
        await asyncio.sleep(60)
        yield {}

    async def scenario() -> FakeReplies:
        handle = FakeHandle([slow_replica])
        engine = RemoteEngine(handle, "m", 30.0, [])
        steps: list[int] = []
        task = asyncio.ensure_future(engine.submit(image_job("long", steps=100), lambda p: steps.append(p.step)))
        while not steps:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle.calls[0]

    assert asyncio.run(scenario()).cancelled


def test_jobs_and_images_cross_as_arrays_not_pil_objects():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    mask = Image.fromarray(np.random.default_rng(1).integers(0, 2, (16, 24), dtype=np.uint8) * 255, mode="L")
    job = dataclasses.replace(image_job("edit", size=(24, 16)), task=Task.EDIT, images=(rgb,), mask=mask)
    message = wire.job_to_wire(job, 12.0, Priority.JOB)
    assert message["priority"] == Priority.JOB  # the replica's engine schedules it as an async job
    assert all(isinstance(value, np.ndarray) for value in message["images"]) and isinstance(message["mask"], np.ndarray)
    back = wire.job_from_wire(message)
    assert back == job and back.mask.mode == "L"
    assert np.array_equal(np.asarray(back.images[0]), np.asarray(rgb))
    assert np.array_equal(np.asarray(back.mask), np.asarray(mask))
