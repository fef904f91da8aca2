"""Async jobs with the fake model: submission, polling, cancel, delete, events, limits, expiry."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.fakes import FakeRunner, colour_of, fake_app, png_bytes, threads_calling
from tests.unit.test_api import assert_envelope, assert_still_serves, wait_ready

GEN = "/v1/images/generations"
JOBS = "/v1/images/jobs"
ASYNC = {"Prefer": "respond-async"}
FAST = {"job_poll_s": 0.05}


def submit(client: TestClient, body: dict, headers: dict | None = None) -> dict:
    response = client.post(GEN, json=body, headers={**ASYNC, **(headers or {})})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"{JOBS}/{job['id']}"
    assert response.headers["preference-applied"] == "respond-async"
    return job


def wait_for(client: TestClient, job_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
             timeout_s: float = 10.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"{JOBS}/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def colour(b64: str) -> tuple[int, ...]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").getpixel((0, 0))


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


@pytest.fixture()
def runner() -> FakeRunner:
    return FakeRunner(step_delay_s=0.01)


@pytest.fixture()
def client(tmp_path: Path, runner: FakeRunner):
    with TestClient(fake_app(tmp_path, runner, **FAST)) as test_client:
        wait_ready(test_client)
        yield test_client


def test_submit_poll_and_fetch_the_images(client):
    job = submit(client, {"prompt": "a fox", "n": 2, "size": "32x16", "seed": 7})
    assert job["object"] == "image.job" and job["status"] == "queued" and job["endpoint"] == "generations"
    assert job["model"] == "fake-model" and job["result"] is None and job["progress"] == 0
    done = wait_for(client, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["attempts"] == 1
    assert done["completed_at"] >= done["started_at"] >= done["created_at"]
    assert done["expires_at"] == pytest.approx(done["completed_at"] + 24 * 3600, abs=1)
    images = done["result"]["data"]
    assert [image["seed"] for image in images] == [7, 8]
    assert [colour(image["b64_json"]) for image in images] == [colour_of("a fox", 7), colour_of("a fox", 8)]
    assert Image.open(io.BytesIO(base64.b64decode(images[0]["b64_json"]))).size == (32, 16)


def test_a_cpu_model_s_worker_encodes_a_job_s_images(tmp_path, monkeypatch):
    from diffuser_api.service.images import ImageService

    threads = threads_calling(monkeypatch, ImageService, "_encode_result")
    with TestClient(fake_app(tmp_path, device="cpu", **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "a fox", "n": 2, "seed": 7})
        images = wait_for(client, job["id"])["result"]["data"]
        assert_still_serves(client)
    assert [colour(image["b64_json"]) for image in images] == [colour_of("a fox", 7), colour_of("a fox", 8)]
    assert len(threads) >= 2 and all(name.startswith("encode-fake#0") for name in threads[:2]), threads


def test_without_the_header_nothing_changes(client):
    response = client.post(GEN, json={"prompt": "sync"}, headers={"Prefer": "return=minimal"})
    assert response.status_code == 200 and "data" in response.json()
    assert client.get(JOBS).json()["data"] == []


def test_url_results_are_served_until_the_job_is_deleted(client):
    job = submit(client, {"prompt": "by url", "response_format": "url"})
    url = wait_for(client, job["id"])["result"]["data"][0]["url"]
    assert "/v1/images/files/jobs/" in url
    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    deleted = client.delete(f"{JOBS}/{job['id']}")
    assert deleted.json() == {"id": job["id"], "object": "image.job.deleted", "deleted": True}
    assert_envelope(client.get(f"{JOBS}/{job['id']}"), 404, param="job_id", code="not_found")
    assert_envelope(client.get(url), 404)
    assert_still_serves(client)


def test_multipart_edit_and_variation_jobs_keep_their_images(client):
    for endpoint, fields in (("edits", {"prompt": "paint it"}), ("variations", {})):
        response = client.post(f"/v1/images/{endpoint}", data={**fields, "size": "32x32"}, headers=ASYNC,
                               files={"image": ("in.png", png_bytes((48, 48)), "image/png")})
        assert response.status_code == 202, response.text
        done = wait_for(client, response.json()["id"])
        assert done["status"] == "completed" and done["endpoint"] == endpoint
    assert [job.task.value for job in client.app.state.registry.get("fake-model").engine_now.workers[0]
            .runner.jobs_seen] == ["edit", "variation"]


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"prompt": "x", "size": "13x7"}, 400, "size", None),
    ({"prompt": "x", "num_inference_steps": 10_000}, 400, "num_inference_steps", None),
    ({"prompt": "x", "stream": True}, 400, "stream", "invalid_value"),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model", None),
])
def test_invalid_jobs_are_refused_before_the_202(client, body, status, param, code):
    assert_envelope(client.post(GEN, json=body, headers=ASYNC), status, param=param, code=code)
    assert client.get(JOBS).json()["data"] == []
    assert_still_serves(client)


def test_a_task_the_model_cannot_do_is_501_at_submission(tmp_path):
    from diffuser_api.domain import Task

    with TestClient(fake_app(tmp_path, tasks=frozenset({Task.GENERATION}), **FAST)) as client:
        wait_ready(client)
        response = client.post("/v1/images/edits", data={"prompt": "x"}, headers=ASYNC,
                               files={"image": ("in.png", png_bytes(), "image/png")})
        assert_envelope(response, 501, code="not_supported")
        assert_still_serves(client)


def test_cancel_a_queued_job_it_never_runs(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    # One job at a time in the engine: the second waits in the database.
    from diffuser_api.engine import EngineLimits

    with TestClient(fake_app(tmp_path, runner, limits=EngineLimits(max_batch_size=1, request_timeout_s=10.0),
                             **FAST)) as client:
        wait_ready(client)
        blocking = [submit(client, {"prompt": f"first {index}", "size": "32x32"}) for index in range(2)]
        waiting = submit(client, {"prompt": "never runs", "size": "32x32"})
        assert client.get(f"{JOBS}/{waiting['id']}").json()["queue_position"] == 0
        cancelled = client.post(f"{JOBS}/{waiting['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"]["code"] == "cancelled"
        gate.set()
        for job in blocking:
            assert wait_for(client, job["id"])["status"] == "completed"
        assert not runner.started("never runs")
        again = client.post(f"{JOBS}/{waiting['id']}/cancel")
        assert_envelope(again, 409, param="job_id", code="job_finished")
        assert again.headers["x-should-retry"] == "false"
        assert_still_serves(client)


def test_cancel_a_running_job_stops_it_at_the_next_step(tmp_path):
    runner = FakeRunner(step_delay_s=0.05)
    with TestClient(fake_app(tmp_path, runner, max_steps=400, **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "long", "size": "32x32", "num_inference_steps": 200})
        wait_for(client, job["id"], ("in_progress",))
        deadline = time.monotonic() + 5
        while not runner.started("long") or runner.batch_of("long").steps < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.post(f"{JOBS}/{job['id']}/cancel").status_code == 200
        done = wait_for(client, job["id"])
        assert done["status"] == "cancelled" and done["result"] is None
        batch = runner.batch_of("long")
        deadline = time.monotonic() + 5
        while batch.finished_at is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        steps = batch.steps
        time.sleep(0.3)
        assert steps == batch.steps < 200  # stopped, and nothing ran since
        assert_still_serves(client)


def test_another_key_sees_404_and_lists_only_its_own(tmp_path):
    keys = {"a": {"Authorization": "Bearer key-a"}, "b": {"Authorization": "Bearer key-b"}}
    with TestClient(fake_app(tmp_path, api_keys=["key-a", "key-b"], **FAST)) as client:
        wait_ready(client)
        response = client.post(GEN, json={"prompt": "mine"}, headers={**ASYNC, **keys["a"]})
        job_id = response.json()["id"]
        for path in (f"{JOBS}/{job_id}", f"{JOBS}/{job_id}/events"):
            assert_envelope(client.get(path, headers=keys["b"]), 404, code="not_found")
        assert_envelope(client.post(f"{JOBS}/{job_id}/cancel", headers=keys["b"]), 404)
        assert_envelope(client.delete(f"{JOBS}/{job_id}", headers=keys["b"]), 404)
        assert client.get(JOBS, headers=keys["b"]).json()["data"] == []
        assert wait_for(client, job_id, headers=keys["a"])["status"] == "completed"
        assert [job["id"] for job in client.get(JOBS, headers=keys["a"]).json()["data"]] == [job_id]


def test_list_is_newest_first_with_pages_and_a_status_filter(client):
    ids = [submit(client, {"prompt": f"list {index}", "size": "32x32"})["id"] for index in range(5)]
    for job_id in ids:
        wait_for(client, job_id)
    page = client.get(JOBS, params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [job["id"] for job in page["data"]] == ids[::-1][:2]
    assert (page["first_id"], page["last_id"]) == (ids[4], ids[3])
    rest = client.get(JOBS, params={"limit": 10, "after": page["last_id"]}).json()
    assert [job["id"] for job in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert len(client.get(JOBS, params={"status": "completed"}).json()["data"]) == 5
    assert client.get(JOBS, params={"status": "queued"}).json()["data"] == []
    assert_envelope(client.get(JOBS, params={"status": "done"}), 400, param="status")
    assert_envelope(client.get(JOBS, params={"after": "imgjob_nope"}), 400, param="after")
    assert_still_serves(client)


def test_a_list_gives_completed_jobs_images_as_urls_and_the_job_as_its_request_asked(client):
    """A page of 100 jobs of ten 1024x1024 images in base64 would be about 2 GB to build."""
    job = submit(client, {"prompt": "listed", "size": "32x32", "n": 2})
    done = wait_for(client, job["id"])
    assert [set(image) & {"b64_json", "url"} for image in done["result"]["data"]] == [{"b64_json"}] * 2
    listed = next(item for item in client.get(JOBS).json()["data"] if item["id"] == job["id"])
    assert [set(image) & {"b64_json", "url"} for image in listed["result"]["data"]] == [{"url"}] * 2
    assert [image["seed"] for image in listed["result"]["data"]] == [image["seed"] for image in done["result"]["data"]]
    for listed_image, image in zip(listed["result"]["data"], done["result"]["data"], strict=True):
        fetched = client.get(listed_image["url"])
        assert fetched.status_code == 200
        assert fetched.content == base64.b64decode(image["b64_json"])
    assert_still_serves(client)


def test_the_same_idempotency_key_returns_the_first_job(client):
    first = submit(client, {"prompt": "once"}, {"Idempotency-Key": "k-1"})
    again = submit(client, {"prompt": "once"}, {"Idempotency-Key": "k-1"})
    other = submit(client, {"prompt": "once"}, {"Idempotency-Key": "k-2"})
    assert again["id"] == first["id"] != other["id"]
    assert len(client.get(JOBS).json()["data"]) == 2


def test_pending_job_limits_answer_429_with_retry_after(tmp_path):
    gate = threading.Event()
    with TestClient(fake_app(tmp_path, FakeRunner(gate=gate), max_jobs_per_key=2, **FAST)) as client:
        wait_ready(client)
        jobs = [submit(client, {"prompt": f"p{index}", "size": "32x32"}) for index in range(2)]
        refused = client.post(GEN, json={"prompt": "third"}, headers=ASYNC)
        assert_envelope(refused, 429, code="rate_limit_exceeded")
        assert float(refused.headers["retry-after"]) > 0
        gate.set()
        for job in jobs:
            wait_for(client, job["id"])
        submit(client, {"prompt": "room again"})
        assert_still_serves(client)


def test_finished_jobs_expire_with_410_and_their_images_go(tmp_path):
    with TestClient(fake_app(tmp_path, job_ttl_s=0.5, **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "short lived", "response_format": "url"})
        url = wait_for(client, job["id"])["result"]["data"][0]["url"]
        time.sleep(0.6)
        assert_envelope(client.get(f"{JOBS}/{job['id']}"), 410, param="job_id", code="job_expired")
        assert_envelope(client.get(f"{JOBS}/{job['id']}/events"), 410)
        assert_envelope(client.post(f"{JOBS}/{job['id']}/cancel"), 410)
        assert_still_serves(client)
        folder = tmp_path / "images" / "jobs"
        deadline = time.monotonic() + 15
        while any(folder.iterdir()):
            assert time.monotonic() < deadline, "the expired job's images were never deleted"
            time.sleep(0.1)
        assert client.get(url).status_code == 404


def test_events_attach_mid_run_and_replay_after_the_end(tmp_path):
    runner = FakeRunner(step_delay_s=0.03)
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "followed", "n": 2, "size": "32x32", "num_inference_steps": 20,
                              "partial_images": 2})
        wait_for(client, job["id"], ("in_progress",))
        with client.stream("GET", f"{JOBS}/{job['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        names = [name for name, _ in events]
        assert names[0] == "image.job.progress"
        steps = [body["step"] for name, body in events if name == "image.job.progress" and body["step"]]
        assert steps and steps == sorted(steps) and steps[-1] == 20
        assert "image_generation.partial_image" in names
        completed = [body for name, body in events if name == "image_generation.completed"]
        assert [body["image_index"] for body in completed] == [0, 1]
        assert colour(completed[1]["b64_json"]) == colour_of("followed", completed[1]["seed"])
        final = events[-1][1]["job"]
        assert names[-1] == "image.job.completed" and final["status"] == "completed"
        # The images came in the completed events: the final job names them by url, not again in base64.
        for body, image in zip(completed, final["result"]["data"], strict=True):
            assert "b64_json" not in image and image["seed"] == body["seed"]
            assert client.get(image["url"]).content == base64.b64decode(body["b64_json"])
        with client.stream("GET", f"{JOBS}/{job['id']}/events") as response:
            replay = [name for name, _ in sse_events(response)]
        assert replay == ["image_generation.completed"] * 2 + ["image.job.completed"]


def test_metrics_count_jobs_by_status_and_their_latency(client):
    wait_for(client, submit(client, {"prompt": "counted"})["id"])
    # Counted at the dispatcher's next poll, not by the scrape itself.
    deadline = time.monotonic() + 5
    while 'diffuser_jobs{status="completed"} 1.0' not in (text := client.get("/metrics").text):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert 'diffuser_job_duration_seconds_count{model="fake-model",status="completed"} 1.0' in text
    assert 'diffuser_job_attempts_sum{model="fake-model",status="completed"} 1.0' in text


def test_jobs_ignore_the_request_timeout(tmp_path):
    runner = FakeRunner(step_delay_s=0.05)
    from diffuser_api.engine import EngineLimits

    with TestClient(fake_app(tmp_path, runner, limits=EngineLimits(request_timeout_s=0.2), **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "slow", "num_inference_steps": 10})
        assert wait_for(client, job["id"])["status"] == "completed"


def test_a_job_that_fails_every_attempt_fails_with_the_reason(tmp_path):
    from diffuser_api.errors import ModelFailure

    runner = FakeRunner(fail_on={"doomed": ModelFailure("the pipeline broke")})
    with TestClient(fake_app(tmp_path, runner, job_max_attempts=2, **FAST)) as client:
        wait_ready(client)
        done = wait_for(client, submit(client, {"prompt": "doomed"})["id"])
        assert done["status"] == "failed" and done["attempts"] == 2
        assert done["error"]["type"] == "server_error" and "the pipeline broke" in done["error"]["message"]
        assert sum(batch.prompts == ("doomed",) for batch in runner.batches) == 2
        assert_still_serves(client)


def test_a_stopping_server_gives_running_and_queued_jobs_back_for_the_next_start(tmp_path):
    runner = FakeRunner(step_delay_s=0.05)
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        running = submit(client, {"prompt": "interrupted", "num_inference_steps": 100, "size": "32x32"})
        queued = submit(client, {"prompt": "waiting", "size": "16x16"})
        wait_for(client, running["id"], ("in_progress",))
    assert runner.started("interrupted")
    with TestClient(fake_app(tmp_path, FakeRunner(), **FAST)) as client:
        wait_ready(client)
        for job in (running, queued):
            done = wait_for(client, job["id"])
            # Not failed, and the interrupted run did not count as an attempt.
            assert done["status"] == "completed" and done["attempts"] == 1, done


def test_a_job_claimed_as_the_server_stops_goes_back_to_the_queue_unspent(tmp_path, monkeypatch):
    """Shutdown can cancel a job's task before its first step (claimed in the same moment): the
    task never enters its body, so ``stop`` gives the job back itself. Before, it stayed in
    progress until the next start took it back, as a crash, with an attempt spent."""
    from diffuser_api.jobs.dispatcher import JobDispatcher

    tick, stop = JobDispatcher._tick, JobDispatcher.stop

    async def no_claims(self):
        pass

    async def claim_then_stop(self):
        model = next(iter(self._registry))
        for record in self._store.claim(model.id, 1, self.replica, time.time(), 60.0):
            self._start(record, [])
        await stop(self)

    monkeypatch.setattr(JobDispatcher, "_tick", no_claims)
    monkeypatch.setattr(JobDispatcher, "stop", claim_then_stop)
    runner = FakeRunner()
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "claimed at shutdown", "size": "16x16"})
    assert not runner.started("claimed at shutdown")
    monkeypatch.setattr(JobDispatcher, "_tick", tick)
    monkeypatch.setattr(JobDispatcher, "stop", stop)
    with TestClient(fake_app(tmp_path, FakeRunner(), **FAST)) as client:
        wait_ready(client)
        done = wait_for(client, job["id"])
        assert done["status"] == "completed" and done["attempts"] == 1, done


@pytest.mark.parametrize(("header", "applies"), [
    ("respond-async", True), ("return=minimal, respond-async", True), ("Respond-Async; wait=5", True),
    ("respond-asynchronously", False), ("return=representation", False),
])
def test_prefer_header_parsing(tmp_path, header, applies):
    with TestClient(fake_app(tmp_path, **FAST)) as client:
        wait_ready(client)
        response = client.post(GEN, json={"prompt": "p", "size": "16x16"}, headers={"Prefer": header})
        assert response.status_code == (202 if applies else 200), response.text


def test_a_job_cancelled_the_moment_it_is_claimed_ends_cancelled(tmp_path, monkeypatch):
    """A cancel can reach the dispatcher between a job's task being created and its first step.
    A task cancelled then never enters its body (not even its ``finally``): the job stayed in
    progress, its lease renewed forever."""
    from diffuser_api.jobs.dispatcher import JobDispatcher

    start = JobDispatcher._start

    def start_then_cancel(self, record, inputs):
        start(self, record, inputs)
        self.stop_here(record.id)

    monkeypatch.setattr(JobDispatcher, "_start", start_then_cancel)
    with TestClient(fake_app(tmp_path, **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "cancelled at once"})
        assert wait_for(client, job["id"], timeout_s=5)["status"] == "cancelled"
        assert_still_serves(client)


def test_the_jobs_of_one_pipeline_call_record_their_outcomes_in_one_transaction(tmp_path, monkeypatch):
    """Their images are stored one after another, so they reach the database a few ms apart;
    the first waits for the others that already left the engine (not for a fixed time)."""
    from diffuser_api.jobs.dispatcher import JobDispatcher
    from diffuser_api.jobs.store import JobStore

    groups: list[int] = []
    finish, save = JobStore.finish, JobDispatcher._save

    def counted(self, outcomes, *args, **kwargs):
        groups.append(len(outcomes))
        return finish(self, outcomes, *args, **kwargs)

    def slow_save(self, image, request):  # storing a call's 8 images takes tens of ms, as with real PNGs
        time.sleep(0.01)
        return save(self, image, request)

    monkeypatch.setattr(JobStore, "finish", counted)
    monkeypatch.setattr(JobDispatcher, "_save", slow_save)
    gate = threading.Event()
    runner = FakeRunner(gate=gate, step_delay_s=0.05)  # calls 0.2 s apart: each its own group
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        jobs = [submit(client, {"prompt": f"fox {index}", "size": "32x32", "n": 2}) for index in range(6)]
        for job in jobs:  # all claimed while the first pipeline call is held
            wait_for(client, job["id"], ("in_progress",))
        gate.set()
        for job in jobs:
            assert wait_for(client, job["id"])["status"] == "completed"
        assert sum(groups) == len(jobs)
        assert groups == [len(batch.jobs) for batch in runner.batches]
        started = time.monotonic()
        alone = wait_for(client, submit(client, {"prompt": "alone", "size": "32x32"})["id"])
        assert alone["status"] == "completed" and groups[-1] == 1
        assert time.monotonic() - started < 5
        assert_still_serves(client)
