"""Batch lines are charged to their caller's image limit as they run, not when the batch is
submitted: a line over the budget waits for the window instead of failing, and interactive
requests of the same caller see what the lines spent."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from diffuser_api.domain import ImageJob
from tests.fakes import FakeRunner, fake_app
from tests.unit.test_api import GEN, assert_envelope, wait_ready
from tests.unit.test_auth import bearer, sha
from tests.unit.test_batches import FAST, create_batch, file_lines, gen_line, jsonl, upload, wait_batch
from tests.unit.test_jobs import submit, wait_for

SMALL, BIG = bearer("sk-small"), bearer("sk-big")


class TimedRunner(FakeRunner):
    """Notes when each image's job ran, to see how lines spread over the windows."""

    def __init__(self) -> None:
        super().__init__()
        self.ran_at: list[float] = []
        self._lock = threading.Lock()

    def run(self, jobs: Sequence[ImageJob], on_step):  # type: ignore[no-untyped-def]
        with self._lock:
            self.ran_at.extend(time.monotonic() for job in jobs for _ in range(job.n))
        return super().run(jobs, on_step)


def keys_file(tmp_path: Path, small_images: str) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([
        {"name": "small", "key_sha256": sha("sk-small"), "limits": {"images": small_images}},
        {"name": "big", "key_sha256": sha("sk-big")},
    ]))
    return path


def test_a_batch_larger_than_the_image_limit_completes_spread_over_the_windows(tmp_path):
    runner = TimedRunner()
    with TestClient(fake_app(tmp_path, runner, rate_limit_images="2/second", **FAST)) as client:
        wait_ready(client)
        source = upload(client, jsonl([gen_line(index) for index in range(6)]))
        started = time.monotonic()
        batch = wait_batch(client, create_batch(client, source["id"])["id"], timeout_s=30)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        assert len(file_lines(client, batch["output_file_id"])) == 6 and batch["error_file_id"] is None
        # Never more than two images in any one second: six lines need three windows.
        times = sorted(runner.ran_at)
        assert len(times) == 6
        assert all(later - earlier >= 0.9 for earlier, later in zip(times, times[2:], strict=False)), times
        assert time.monotonic() - started >= 1.9


def test_lines_over_the_budget_wait_and_interactive_requests_see_what_they_spent(tmp_path):
    runner = FakeRunner()
    app = fake_app(tmp_path, runner, api_keys_file=keys_file(tmp_path, "3/hour"), **FAST)
    with TestClient(app) as client:
        wait_ready(client)
        # The first line asks for more images than the limit allows at all: it fails alone.
        lines = [gen_line(0, n=4), *(gen_line(index) for index in range(1, 6))]
        source = upload(client, jsonl(lines), headers=SMALL)
        batch = create_batch(client, source["id"], headers=SMALL)
        deadline = time.monotonic() + 10
        while (counts := wait_batch(client, batch["id"], ("in_progress",), headers=SMALL)["request_counts"]) != {
            "total": 6, "completed": 3, "failed": 1,
        }:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
        time.sleep(0.5)  # ten polls: the two lines left still wait for the window
        waiting = client.get(f"/v1/batches/{batch['id']}", headers=SMALL).json()
        assert waiting["status"] == "in_progress"
        assert waiting["request_counts"] == {"total": 6, "completed": 3, "failed": 1}
        assert sum(len(recorded.jobs) for recorded in runner.batches) == 3
        # The lines spent the key's budget: its own requests are refused, another key's are not.
        assert_envelope(client.post(GEN, json={"prompt": "x", "size": "32x32"}, headers=SMALL), 429,
                        code="rate_limit_exceeded")
        assert client.post(GEN, json={"prompt": "x", "size": "32x32"}, headers=BIG).status_code == 200
        cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=SMALL).json()
        assert cancelled["status"] in ("cancelling", "cancelled")
        done = wait_batch(client, batch["id"], headers=SMALL)
        assert done["status"] == "cancelled"
        assert done["request_counts"] == {"total": 6, "completed": 3, "failed": 1}
        errors = file_lines(client, done["error_file_id"], headers=SMALL)
        assert errors["req-0"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
        assert {errors[f"req-{index}"]["error"]["code"] for index in (4, 5)} == {"batch_cancelled"}


def test_async_jobs_are_charged_once_at_submission(tmp_path):
    with TestClient(fake_app(tmp_path, api_keys_file=keys_file(tmp_path, "2/hour"), **FAST)) as client:
        wait_ready(client)
        job = submit(client, {"prompt": "x", "n": 2, "size": "32x32"}, headers=SMALL)
        # Charged again as it ran, it would wait for the window (an hour) instead of finishing.
        assert wait_for(client, job["id"], headers=SMALL)["status"] == "completed"
        assert_envelope(client.post(GEN, json={"prompt": "x", "size": "32x32"}, headers=SMALL), 429,
                        code="rate_limit_exceeded")
        assert client.post(GEN, json={"prompt": "x", "size": "32x32"}, headers=BIG).status_code == 200
