"""Async jobs on real ``diffuser-api serve`` processes with tiny-sd: the official SDK, events
over a real socket, and nothing lost when the server is killed or stopped."""

from __future__ import annotations

import base64
import json
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import LiveServer
from tests.unit.test_webhooks import SECRET, receiver  # noqa: F401 (a fixture: a real HTTP receiver)

pytestmark = pytest.mark.slow

ASYNC = {"Prefer": "respond-async"}
FINAL = ("completed", "failed", "cancelled")


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=60)


def submit(client: openai.OpenAI, prompt: str, **options) -> dict:
    raw = client.images.with_raw_response.generate(prompt=prompt, size="64x64", extra_headers=ASYNC, **options)
    assert raw.status_code == 202
    assert raw.headers["preference-applied"] == "respond-async"
    job = raw.http_response.json()
    assert raw.headers["location"] == f"/v1/images/jobs/{job['id']}"
    return job


def job_of(server: LiveServer, job_id: str) -> dict:
    return httpx.get(f"{server.base_url}/v1/images/jobs/{job_id}", timeout=10).json()


def wait_all(server: LiveServer, ids: list[str], statuses=FINAL, timeout_s: float = 600.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = {job_id: job_of(server, job_id) for job_id in ids}
        if all(job["status"] in statuses for job in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, f"jobs never reached {statuses}: {summary(jobs)}"
        time.sleep(0.2)


def summary(jobs: dict[str, dict]) -> dict[str, tuple[str, int, int]]:
    return {job_id: (job["status"], job["progress"], job["attempts"]) for job_id, job in jobs.items()}


def finished_lines(logs: list[Path], job_id: str) -> int:
    return sum(line.count(f"job {job_id} ") for log in logs for line in log.read_text().splitlines()
               if " completed after " in line)


def test_sdk_submit_poll_and_follow_events(tiny_sd_server):
    client = sdk(tiny_sd_server)
    job = submit(client, "a lighthouse", n=2, extra_body={"num_inference_steps": 30, "partial_images": 1})
    with httpx.stream("GET", f"{tiny_sd_server.base_url}/v1/images/jobs/{job['id']}/events", timeout=120) as events:
        names = [line.removeprefix("event: ") for line in events.iter_lines() if line.startswith("event: ")]
    assert names[0] == "image.job.progress" and names[-1] == "image.job.completed"
    assert names.count("image_generation.completed") == 2
    done = client.get(f"/images/jobs/{job['id']}", cast_to=object)
    assert done["status"] == "completed" and len(done["result"]["data"]) == 2
    listed = client.get("/images/jobs", cast_to=object)
    (item,) = [item for item in listed["data"] if item["id"] == job["id"]]
    # A list gives images by url, each served by this server as the job's own answer has it.
    for listed_image, image in zip(item["result"]["data"], done["result"]["data"], strict=True):
        assert "b64_json" not in listed_image
        assert httpx.get(listed_image["url"], timeout=10).content == base64.b64decode(image["b64_json"])
    # The server still answers a normal request afterwards.
    assert len(client.images.generate(prompt="still here", size="64x64").data) == 1


def test_sigkill_with_jobs_queued_and_running_then_restart_runs_each_once(tmp_path):
    env = {"DIFFUSER_MAX_STEPS": "2000", "DIFFUSER_MAX_BATCH_SIZE": "1", "DIFFUSER_JOB_POLL_S": "0.2",
           "DIFFUSER_STORAGE_DIR": str(tmp_path / "images"), "DIFFUSER_JOBS_URL": f"sqlite:///{tmp_path / 'jobs.db'}"}
    first = LiveServer(tmp_path, **env)
    try:
        first.wait_ready()
        client = sdk(first)
        ids = [submit(client, f"job {index}", extra_body={"num_inference_steps": 200})["id"] for index in range(3)]
        deadline = time.monotonic() + 120
        while not (job_of(first, ids[0]).get("progress") or 0) > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        statuses = [job_of(first, job_id)["status"] for job_id in ids]
        assert "in_progress" in statuses and "queued" in statuses
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    second = LiveServer(tmp_path, **env)
    try:
        second.wait_ready()
        jobs = wait_all(second, ids)
    finally:
        second.stop()
    assert [job["status"] for job in jobs.values()] == ["completed"] * 3
    assert jobs[ids[0]]["attempts"] == 2  # killed mid-run, started again from step 0
    assert all(len(job["result"]["data"]) == 1 for job in jobs.values())
    for job_id in ids:
        assert finished_lines([first.log, second.log], job_id) == 1


def test_sigterm_puts_running_jobs_back_without_failing_them(tmp_path):
    env = {"DIFFUSER_MAX_STEPS": "2000", "DIFFUSER_MAX_BATCH_SIZE": "1", "DIFFUSER_JOB_POLL_S": "0.2",
           "DIFFUSER_SHUTDOWN_GRACE_S": "2", "DIFFUSER_JOBS_URL": f"sqlite:///{tmp_path / 'jobs.db'}"}
    first = LiveServer(tmp_path, **env)
    try:
        first.wait_ready()
        client = sdk(first)
        ids = [submit(client, f"term {index}", extra_body={"num_inference_steps": 1000})["id"] for index in range(3)]
        deadline = time.monotonic() + 120
        while job_of(first, ids[0])["status"] != "in_progress" or not job_of(first, ids[0])["progress"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        first.stop()
    assert f"job {ids[0]} (request" in first.log.read_text() and "queued again" in first.log.read_text()
    second = LiveServer(tmp_path, **{**env, "DIFFUSER_MAX_STEPS": "2000"})
    try:
        second.wait_ready()
        before = {job_id: job_of(second, job_id) for job_id in ids}
        # Given back on SIGTERM: no attempt was spent on the interrupted run.
        assert all(job["status"] in ("queued", "in_progress") for job in before.values())
        for job_id in ids:
            httpx.post(f"{second.base_url}/v1/images/jobs/{job_id}/cancel", timeout=10)
        jobs = wait_all(second, ids)
    finally:
        second.stop()
    assert all(job["status"] == "cancelled" for job in jobs.values())
    assert all(job["attempts"] <= 1 for job in jobs.values()), jobs
    assert json.dumps(jobs).count('"failed"') == 0


def test_a_webhook_names_the_jobs_images_by_urls_a_receiver_can_fetch(tmp_path, receiver):  # noqa: F811
    """The real server posts, signed, to a real receiver; the urls point at this server."""
    from standardwebhooks import Webhook

    server = LiveServer(tmp_path, DIFFUSER_JOB_WEBHOOK_URL=receiver.url, DIFFUSER_JOB_WEBHOOK_SECRET=SECRET)
    try:
        server.wait_ready()
        job = submit(sdk(server), "a lighthouse", n=2, extra_body={"num_inference_steps": 2})
        deadline = time.monotonic() + 120
        while not receiver.deliveries and time.monotonic() < deadline:
            time.sleep(0.05)
        (delivery,) = receiver.deliveries
        message = Webhook(SECRET).verify(delivery.body, delivery.headers)
        assert message["type"] == "image.job.completed" and message["data"]["id"] == job["id"]
        for image in message["data"]["result"]["data"]:
            fetched = httpx.get(image["url"], timeout=10)
            assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    finally:
        server.stop()
