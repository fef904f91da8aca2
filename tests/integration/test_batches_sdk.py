"""The Batch API and Files API through the official ``openai`` SDK against real servers: the
fake model on uvicorn for the shapes and refusals, ``diffuser-api serve`` with tiny-sd for the
pixels, a cancel mid-run and a SIGKILL mid-batch."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer
from tests.fakes import FakeRunner, fake_app, png_bytes
from tests.servers import ThreadedServer

GEN_URL = "/v1/images/generations"
EDIT_URL = "/v1/images/edits"
FINAL = ("completed", "failed", "cancelled", "expired")


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = FINAL, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} never reached {statuses}: {batch}")


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def assert_error(error: openai.APIStatusError, status: int, param: str | None, code: str | None) -> None:
    assert error.status_code == status
    body = error.response.json()["error"]
    assert {"message", "type", "param", "code", "request_id"} <= set(body) and body["message"]
    assert body["request_id"] == error.response.headers["x-request-id"]
    assert (body["param"], body["code"]) == (param, code)


def test_the_sdk_round_trip_and_its_refusals_on_a_real_server(tmp_path: Path):
    with ThreadedServer(fake_app(tmp_path, FakeRunner(), job_poll_s=0.05)) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0)
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": GEN_URL,
                  "body": {"prompt": f"p{i}", "size": "32x32", "seed": i}} for i in range(6)]
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch",
                                     expires_after={"anchor": "created_at", "seconds": 7200})
        assert source.purpose == "batch" and source.expires_at == source.created_at + 7200
        batch = client.batches.create(input_file_id=source.id, endpoint=GEN_URL, completion_window="24h",
                                      metadata={"k": "v"},
                                      output_expires_after={"anchor": "created_at", "seconds": 3600})
        done = wait_batch(client, batch.id, timeout_s=30)
        assert done.status == "completed" and done.request_counts.completed == 6 and done.metadata == {"k": "v"}
        assert [line["custom_id"] for line in output_lines(client, done.output_file_id)] == [f"c{i}" for i in range(6)]
        output = client.files.retrieve(done.output_file_id)
        assert output.purpose == "batch_output" and output.expires_at == pytest.approx(output.created_at + 3600, abs=1)
        assert [item.id for item in client.batches.list()] == [batch.id]
        assert {item.id for item in client.files.list()} == {source.id, done.output_file_id}

        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(input_file_id="file-missing", endpoint=GEN_URL, completion_window="24h")
        assert_error(refused.value, 400, "input_file_id", "invalid_file_id")
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("x.bin", b"data"), purpose="assistants")
        assert_error(refused.value, 400, "purpose", "invalid_value")
        with pytest.raises(openai.NotFoundError) as missing:
            client.batches.retrieve("batch_nothere")
        assert_error(missing.value, 404, "batch_id", "not_found")
        with pytest.raises(openai.ConflictError) as finished:
            client.batches.cancel(batch.id)
        assert_error(finished.value, 409, "batch_id", "batch_not_cancellable")

        image = client.files.create(file=("cat.png", png_bytes()), purpose="vision")
        edit = client.post("/images/edits", cast_to=object,
                           body={"prompt": "x", "images": [{"file_id": image.id}], "size": "32x32"})
        assert edit["data"][0]["b64_json"]
        assert client.files.delete(source.id).deleted
        assert client.images.generate(prompt="still serving", size="32x32").data[0].b64_json


@pytest.mark.slow
def test_tiny_sd_batches_match_the_synchronous_images(tmp_path: Path):
    """40 generations and 10 edits (data URLs) run as batches give the image the same request
    gives synchronously, line by line."""
    server = LiveServer(tmp_path, DIFFUSER_JOBS_URL=f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
                        DIFFUSER_JOB_POLL_S="0.2")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)
        rng = np.random.default_rng(3)
        source_png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source_png, "PNG")
        data_url = "data:image/png;base64," + base64.b64encode(source_png.getvalue()).decode()
        gens = [{"custom_id": f"gen-{i}", "method": "POST", "url": GEN_URL,
                 "body": {"prompt": f"a red cube number {i % 7}", "size": "64x64", "seed": 1000 + i,
                          "num_inference_steps": 2}} for i in range(40)]
        edits = [{"custom_id": f"edit-{i}", "method": "POST", "url": EDIT_URL,
                  "body": {"prompt": f"make it blue {i}", "images": [{"image_url": data_url}], "seed": 50 + i,
                           "num_inference_steps": 2}} for i in range(10)]
        for endpoint, lines in ((GEN_URL, gens), (EDIT_URL, edits)):
            path = endpoint.removeprefix("/v1")
            source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = client.batches.create(input_file_id=source.id, endpoint=endpoint, completion_window="24h")
            done = wait_batch(client, batch.id)
            assert done.status == "completed" and done.error_file_id is None, done
            assert done.request_counts.total == done.request_counts.completed == len(lines)
            results = {line["custom_id"]: line for line in output_lines(client, done.output_file_id)}
            assert sorted(results) == sorted(line["custom_id"] for line in lines)
            # The synchronous requests 16 at a time, so the engine batches them as it does the lines.
            with ThreadPoolExecutor(16) as pool:
                syncs = pool.map(lambda body, path=path: client.post(path, cast_to=object, body=body),
                                 [line["body"] for line in lines])
            for line, sync in zip(lines, syncs, strict=True):
                batched = results[line["custom_id"]]["response"]["body"]["data"][0]["b64_json"]
                assert np.abs(pixels(batched) - pixels(sync["data"][0]["b64_json"])).max() <= 2, line["custom_id"]
    finally:
        server.stop()


@pytest.mark.slow
def test_cancel_mid_run_and_sigkill_mid_batch_on_the_real_server(tmp_path: Path):
    """Cancel: the output holds the lines that ran, the error file the rest. SIGKILL mid-batch,
    restart on the same database: each custom_id exactly once in the output."""
    env = {"DIFFUSER_JOBS_URL": f"sqlite:///{tmp_path / 'jobs.sqlite3'}", "DIFFUSER_JOB_POLL_S": "0.2",
           "DIFFUSER_STORAGE_DIR": str(tmp_path / "images"),
           # Two lines per pipeline call, so at most four run at once and most are still queued.
           "DIFFUSER_MAX_BATCH_SIZE": "2"}
    lines = [{"custom_id": f"slow-{i}", "method": "POST", "url": GEN_URL,
              "body": {"prompt": f"a slow cube {i}", "size": "64x64", "seed": i, "num_inference_steps": 6}}
             for i in range(12)]
    server = LiveServer(tmp_path, **env)
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        cancelled = client.batches.create(input_file_id=source.id, endpoint=GEN_URL, completion_window="24h")
        wait_batch(client, cancelled.id, ("in_progress",))
        at_cancel = client.batches.cancel(cancelled.id)
        assert at_cancel.status in ("cancelling", "cancelled")
        cancelled = wait_batch(client, cancelled.id)
        assert cancelled.status == "cancelled"
        done_lines = output_lines(client, cancelled.output_file_id)
        never_ran = output_lines(client, cancelled.error_file_id)
        assert len(done_lines) + len(never_ran) == 12 and never_ran
        # Only the lines already handed to the engine (two calls of two) finish after the cancel.
        assert len(done_lines) <= at_cancel.request_counts.completed + 4
        assert all(line["error"]["code"] == "batch_cancelled" for line in never_ran)

        killed = client.batches.create(input_file_id=source.id, endpoint=GEN_URL, completion_window="24h")
        deadline = time.monotonic() + 120
        while client.batches.retrieve(killed.id).request_counts.completed < 2:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.1)
        server.process.kill()
        server.process.wait()
    finally:
        server.stop()
    restarted = LiveServer(tmp_path, **env)
    try:
        restarted.wait_ready()
        client = openai.OpenAI(base_url=f"{restarted.base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)
        done = wait_batch(client, killed.id)
        assert done.status == "completed" and done.request_counts.completed == 12, done
        ids = [line["custom_id"] for line in output_lines(client, done.output_file_id)]
        assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
        assert done.error_file_id is None
    finally:
        restarted.stop()
