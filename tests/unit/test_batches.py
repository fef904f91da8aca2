"""The Batch API and Files API with the fake model: uploads, validation, runs, cancel, expiry,
ownership, idempotency, and every refusal's envelope."""

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

from tests.fakes import FakeRunner, colour_of, fake_app, png_bytes
from tests.unit.test_api import assert_envelope, assert_still_serves, wait_ready

GEN_URL = "/v1/images/generations"
EDIT_URL = "/v1/images/edits"
FAST = {"job_poll_s": 0.05}
FINAL = ("completed", "failed", "cancelled", "expired")


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def gen_line(index: int, **body) -> dict:
    return {"custom_id": f"req-{index}", "method": "POST", "url": GEN_URL,
            "body": {"prompt": f"prompt {index}", "size": "32x32", "seed": 100 + index, **body}}


def upload(client: TestClient, data: bytes, purpose: str = "batch", headers: dict | None = None,
           filename: str = "input.jsonl", **fields: str) -> dict:
    response = client.post("/v1/files", data={"purpose": purpose, **fields},
                           files={"file": (filename, data, "application/octet-stream")}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def create_batch(client: TestClient, file_id: str, endpoint: str = GEN_URL, headers: dict | None = None,
                 **extra) -> dict:
    response = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint,
                                                "completion_window": "24h", **extra}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def wait_batch(client: TestClient, batch_id: str, statuses: tuple[str, ...] = FINAL, timeout_s: float = 20.0,
               headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}", headers=headers).json()
        if batch["status"] in statuses:
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} never reached {statuses}: {batch}")


def file_lines(client: TestClient, file_id: str | None, headers: dict | None = None) -> dict[str, dict]:
    if file_id is None:
        return {}
    response = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    return {line["custom_id"]: line for line in lines}


def colour(b64: str) -> tuple[int, ...]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").getpixel((0, 0))


@pytest.fixture()
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture()
def client(tmp_path: Path, runner: FakeRunner):
    with TestClient(fake_app(tmp_path, runner, **FAST)) as test_client:
        wait_ready(test_client)
        yield test_client


# -- files ------------------------------------------------------------------------------------


def test_upload_read_list_download_and_delete_a_file(client):
    data = jsonl([gen_line(1), gen_line(2)])
    created = upload(client, data)
    assert created["object"] == "file" and created["id"].startswith("file-") and created["bytes"] == len(data)
    assert created["purpose"] == "batch" and created["filename"] == "input.jsonl" and created["status"] == "processed"
    assert created["expires_at"] == pytest.approx(created["created_at"] + 30 * 24 * 3600, abs=1)
    assert client.get(f"/v1/files/{created['id']}").json() == created
    listing = client.get("/v1/files").json()
    assert listing["object"] == "list" and [item["id"] for item in listing["data"]] == [created["id"]]
    content = client.get(f"/v1/files/{created['id']}/content")
    assert content.status_code == 200 and content.content == data
    deleted = client.delete(f"/v1/files/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "file", "deleted": True}
    assert_envelope(client.get(f"/v1/files/{created['id']}"), 404, code="not_found")
    assert_envelope(client.get(f"/v1/files/{created['id']}/content"), 404, code="not_found")
    assert_still_serves(client)


def test_expires_after_is_honoured(client):
    created = upload(client, png_bytes(), purpose="vision", filename="cat.png",
                     **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    assert created["expires_at"] == created["created_at"] + 3600
    kept = upload(client, png_bytes(), purpose="vision", filename="cat.png")
    assert kept["expires_at"] is None  # only batch files expire by default


@pytest.mark.parametrize(("fields", "files", "param", "code"), [
    ({}, {"file": ("a.jsonl", b"{}\n")}, "purpose", "missing_required_parameter"),
    ({"purpose": "fine-tune"}, {"file": ("a.jsonl", b"{}\n")}, "purpose", "invalid_value"),
    ({"purpose": "batch"}, None, "file", "missing_required_parameter"),
    ({"purpose": "batch"}, {"file": ("a.jsonl", b"")}, "file", "empty_file"),
    ({"purpose": "batch", "expires_after[anchor]": "now", "expires_after[seconds]": "3600"},
     {"file": ("a.jsonl", b"{}\n")}, "expires_after.anchor", "invalid_value"),
    ({"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "5"},
     {"file": ("a.jsonl", b"{}\n")}, "expires_after.seconds", "invalid_value"),
    ({"purpose": "batch", "other": "x"}, {"file": ("a.jsonl", b"{}\n")}, "other", "unknown_parameter"),
])
def test_bad_uploads_are_400_with_the_envelope(client, tmp_path, fields, files, param, code):
    # Without a file, the fields alone still go as multipart parts.
    parts = files or {name: (None, value) for name, value in fields.items()}
    assert_envelope(client.post("/v1/files", data=fields if files else None, files=parts), 400, param, code)
    assert client.get("/v1/files").json()["data"] == []  # nothing refused was kept
    assert not list((tmp_path / "images" / "files").glob("file-*"))
    assert_still_serves(client)


def test_a_json_body_is_refused(client):
    assert_envelope(client.post("/v1/files", json={"purpose": "batch"}), 400, code="invalid_content_type")
    assert_still_serves(client)


def test_line_cap_size_cap_and_quota(tmp_path):
    app = fake_app(tmp_path, max_batch_lines=3, max_file_bytes=4000, files_max_bytes_per_key=3000, **FAST)
    with TestClient(app) as client:
        wait_ready(client)
        assert_envelope(client.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": ("a.jsonl", jsonl([gen_line(i) for i in range(4)]))}),
                        400, "file", "too_many_lines")
        assert_envelope(client.post("/v1/files", data={"purpose": "vision"}, files={"file": ("a.png", b"x" * 5000)}),
                        413)
        upload(client, b"x" * 2000, purpose="vision", filename="a.png")
        assert_envelope(client.post("/v1/files", data={"purpose": "vision"}, files={"file": ("b.png", b"x" * 1500)}),
                        413, "file", "files_quota_exceeded")
        assert len(client.get("/v1/files").json()["data"]) == 1
        assert len(list((tmp_path / "images" / "files").glob("file-*"))) == 1  # refused bytes deleted
        assert_still_serves(client)


def test_idempotency_key_returns_the_first_file_and_batch(client):
    headers = {"Idempotency-Key": "upload-1"}
    first = upload(client, jsonl([gen_line(1)]), headers=headers)
    again = upload(client, jsonl([gen_line(1)]), headers=headers)
    assert again["id"] == first["id"] and len(client.get("/v1/files").json()["data"]) == 1
    batch = create_batch(client, first["id"], headers={"Idempotency-Key": "batch-1"})
    assert create_batch(client, first["id"], headers={"Idempotency-Key": "batch-1"})["id"] == batch["id"]
    assert len(client.get("/v1/batches").json()["data"]) == 1


# -- batches ----------------------------------------------------------------------------------


def test_a_generations_batch_matches_the_synchronous_results(client):
    lines = [gen_line(i) for i in range(12)]
    source = upload(client, jsonl(lines))
    batch = create_batch(client, source["id"], metadata={"run": "nightly"})
    assert batch["status"] == "validating" and batch["object"] == "batch" and batch["metadata"] == {"run": "nightly"}
    done = wait_batch(client, batch["id"])
    assert done["status"] == "completed" and done["error_file_id"] is None and done["errors"] is None
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert done["completed_at"] >= done["finalizing_at"] >= done["in_progress_at"] >= done["created_at"]
    output = file_lines(client, done["output_file_id"])
    assert sorted(output) == sorted(line["custom_id"] for line in lines)
    for line in lines:
        result = output[line["custom_id"]]
        assert result["id"].startswith("batch_req_") and result["error"] is None
        assert result["response"]["status_code"] == 200 and result["response"]["request_id"]
        image = result["response"]["body"]["data"][0]
        sync = client.post(GEN_URL, json=line["body"]).json()["data"][0]
        assert colour(image["b64_json"]) == colour(sync["b64_json"]) == colour_of(line["body"]["prompt"],
                                                                                 line["body"]["seed"])
    described = client.get(f"/v1/files/{done['output_file_id']}").json()
    assert described["purpose"] == "batch_output" and described["expires_at"] is not None


def test_bad_lines_fail_the_batch_with_line_numbers(client):
    good = json.dumps(gen_line(1))
    raw = "\n".join([
        good,
        "not json",
        json.dumps({"custom_id": "x", "method": "POST", "url": GEN_URL}),
        json.dumps({**gen_line(2), "url": EDIT_URL}),
        good,
        json.dumps({**gen_line(3), "method": "GET"}),
    ]).encode()
    batch = create_batch(client, upload(client, raw)["id"])
    failed = wait_batch(client, batch["id"])
    assert failed["status"] == "failed" and failed["failed_at"] is not None and failed["output_file_id"] is None
    errors = failed["errors"]
    assert errors["object"] == "list"
    assert [(error["line"], error["code"]) for error in errors["data"]] == [
        (2, "invalid_json_line"), (3, "missing_required_parameter"), (4, "mismatched_url"),
        (5, "duplicate_custom_id"), (6, "invalid_method"),
    ]
    assert errors["data"][1]["param"] == "body" and all(error["message"] for error in errors["data"])
    assert_still_serves(client)


def test_a_refused_body_fails_its_line_and_the_rest_runs(client):
    lines = [gen_line(0), gen_line(1, size="13x7"), gen_line(2, bogus=True), gen_line(3), gen_line(4, n="2")]
    done = wait_batch(client, create_batch(client, upload(client, jsonl(lines))["id"])["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    assert sorted(file_lines(client, done["output_file_id"])) == ["req-0", "req-3"]
    errors = file_lines(client, done["error_file_id"])
    assert sorted(errors) == ["req-1", "req-2", "req-4"]
    assert errors["req-4"]["response"]["body"]["error"]["code"] == "invalid_type"  # as the route: JSON is strict
    for custom_id, param in (("req-1", "size"), ("req-2", "bogus"), ("req-4", "n")):
        response = errors[custom_id]["response"]
        assert response["status_code"] == 400
        error = response["body"]["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
        assert error["request_id"] == response["request_id"]


def test_url_lines_point_at_the_stored_images(client):
    done = wait_batch(client, create_batch(client, upload(client, jsonl([gen_line(0, response_format="url")]))["id"])
                      ["id"])
    url = file_lines(client, done["output_file_id"])["req-0"]["response"]["body"]["data"][0]["url"]
    image = client.get(url.removeprefix("http://testserver"))
    assert image.status_code == 200
    assert Image.open(io.BytesIO(image.content)).getpixel((0, 0))[:3] == colour_of("prompt 0", 100)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"endpoint": "/v1/chat/completions"}, "endpoint", "invalid_value"),
    ({"completion_window": "1h"}, "completion_window", "invalid_value"),
    ({"input_file_id": "file-nothere"}, "input_file_id", "invalid_file_id"),
    ({"output_expires_after": {"anchor": "created_at", "seconds": 10}}, "output_expires_after.seconds",
     "invalid_value"),
    ({"extra": 1}, "extra", None),
])
def test_bad_batch_requests_are_400_with_the_envelope(client, body, param, code):
    source = upload(client, jsonl([gen_line(0)]))
    payload = {"input_file_id": source["id"], "endpoint": GEN_URL, "completion_window": "24h", **body}
    assert_envelope(client.post("/v1/batches", json=payload), 400, param, code)
    assert client.get("/v1/batches").json()["data"] == []
    assert_still_serves(client)


def test_a_vision_file_cannot_be_a_batch_input(client):
    image = upload(client, png_bytes(), purpose="vision", filename="a.png")
    payload = {"input_file_id": image["id"], "endpoint": GEN_URL, "completion_window": "24h"}
    assert_envelope(client.post("/v1/batches", json=payload), 400, "input_file_id", "invalid_file_purpose")
    assert_still_serves(client)


def test_cancel_mid_run_keeps_finished_lines_and_never_runs_the_rest(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        lines = [gen_line(i) for i in range(40)]
        batch = create_batch(client, upload(client, jsonl(lines))["id"])
        deadline = time.monotonic() + 10
        while not runner.batches:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancelling = client.post(f"/v1/batches/{batch['id']}/cancel")
        assert cancelling.status_code == 200 and cancelling.json()["status"] == "cancelling"
        gate.set()
        done = wait_batch(client, batch["id"])
        assert done["status"] == "cancelled" and done["cancelled_at"] >= done["cancelling_at"]
        ran = {job.prompt for job in runner.jobs_seen}
        output = file_lines(client, done["output_file_id"])
        errors = file_lines(client, done["error_file_id"])
        assert 0 < len(output) < 40 and len(output) + len(errors) == 40
        assert {f"prompt {custom_id.split('-')[1]}" for custom_id in output} == ran  # running ones finished
        for line in errors.values():
            assert line["response"] is None and line["error"]["code"] == "batch_cancelled"
        time.sleep(0.3)
        assert {job.prompt for job in runner.jobs_seen} == ran  # nothing ran after
        assert done["request_counts"]["completed"] == len(output)
        assert_still_serves(client)


def test_cancelling_a_finished_batch_is_409(client):
    done = wait_batch(client, create_batch(client, upload(client, jsonl([gen_line(0)]))["id"])["id"])
    response = client.post(f"/v1/batches/{done['id']}/cancel")
    assert_envelope(response, 409, "batch_id", "batch_not_cancellable")
    assert response.headers["x-should-retry"] == "false"
    assert_still_serves(client)


def test_a_batch_past_its_window_expires_with_its_partial_output(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    with TestClient(fake_app(tmp_path, runner, batch_window_s=0.5, **FAST)) as client:
        wait_ready(client)
        batch = create_batch(client, upload(client, jsonl([gen_line(i) for i in range(30)]))["id"])
        time.sleep(0.8)
        gate.set()
        done = wait_batch(client, batch["id"])
        assert done["status"] == "expired" and done["expired_at"] is not None
        errors = file_lines(client, done["error_file_id"])
        assert errors and all(line["error"]["code"] == "batch_expired" for line in errors.values())
        assert len(file_lines(client, done["output_file_id"])) + len(errors) == 30


def test_batch_lines_run_after_async_jobs_and_stay_out_of_the_jobs_list(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        batch = create_batch(client, upload(client, jsonl([gen_line(i) for i in range(40)]))["id"])
        wait_batch(client, batch["id"], ("in_progress",))
        job = client.post(GEN_URL, json={"prompt": "async job", "size": "32x32"},
                          headers={"Prefer": "respond-async"}).json()
        gate.set()
        wait_batch(client, batch["id"])
        order = [job_seen.prompt for job_seen in runner.jobs_seen]
        # Claimed before the batch lines still queued when it arrived.
        assert order.index("async job") < len(order) - 10
        listed = client.get("/v1/images/jobs").json()["data"]
        assert [item["id"] for item in listed] == [job["id"]]


def test_another_key_sees_404_for_files_and_batches(tmp_path):
    keys = {"a": {"Authorization": "Bearer key-a"}, "b": {"Authorization": "Bearer key-b"}}
    with TestClient(fake_app(tmp_path, api_keys=["key-a", "key-b"], **FAST)) as client:
        wait_ready(client)
        source = upload(client, jsonl([gen_line(0)]), headers=keys["a"])
        batch = create_batch(client, source["id"], headers=keys["a"])
        for path in (f"/v1/files/{source['id']}", f"/v1/files/{source['id']}/content", f"/v1/batches/{batch['id']}"):
            assert_envelope(client.get(path, headers=keys["b"]), 404, code="not_found")
        assert_envelope(client.delete(f"/v1/files/{source['id']}", headers=keys["b"]), 404)
        assert_envelope(client.post(f"/v1/batches/{batch['id']}/cancel", headers=keys["b"]), 404)
        payload = {"input_file_id": source["id"], "endpoint": GEN_URL, "completion_window": "24h"}
        assert_envelope(client.post("/v1/batches", json=payload, headers=keys["b"]), 400, "input_file_id")
        assert client.get("/v1/files", headers=keys["b"]).json()["data"] == []
        assert client.get("/v1/batches", headers=keys["b"]).json()["data"] == []
        assert client.get(f"/v1/batches/{batch['id']}", headers=keys["a"]).status_code == 200


def test_a_vision_file_id_in_a_json_edit_and_in_a_batch_edit(client):
    image = upload(client, png_bytes(), purpose="vision", filename="cat.png")
    body = {"prompt": "edit", "images": [{"file_id": image["id"]}], "seed": 5, "size": "32x32"}
    sync = client.post(EDIT_URL, json=body)
    assert sync.status_code == 200, sync.text
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    lines = [{"custom_id": "by-file", "method": "POST", "url": EDIT_URL, "body": body},
             {"custom_id": "by-url", "method": "POST", "url": EDIT_URL,
              "body": {**body, "images": [{"image_url": data_url}]}},
             {"custom_id": "bad-file", "method": "POST", "url": EDIT_URL,
              "body": {**body, "images": [{"file_id": "file-missing"}]}}]
    done = wait_batch(client, create_batch(client, upload(client, jsonl(lines))["id"], endpoint=EDIT_URL)["id"])
    output = file_lines(client, done["output_file_id"])
    expected = colour(sync.json()["data"][0]["b64_json"])
    assert {custom_id: colour(line["response"]["body"]["data"][0]["b64_json"]) for custom_id, line in output.items()} \
        == {"by-file": expected, "by-url": expected}
    bad = file_lines(client, done["error_file_id"])["bad-file"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["code"] == "invalid_file_id"
    batch_input = upload(client, jsonl([gen_line(0)]))
    refused = client.post(EDIT_URL, json={**body, "images": [{"file_id": batch_input["id"]}]})
    assert_envelope(refused, 400, "images", "invalid_file_id")
    assert_still_serves(client)


def test_an_interactive_request_waits_for_at_most_the_lines_already_fed_to_the_engine(tmp_path):
    """Lines wait in the database: the engine holds at most two batches' worth of them, so an
    interactive request sent mid-batch runs after those, not after the whole batch."""
    runner = FakeRunner(step_delay_s=0.005)
    with TestClient(fake_app(tmp_path, runner, **FAST)) as client:
        wait_ready(client)
        batch = create_batch(client, upload(client, jsonl([gen_line(i) for i in range(120)]))["id"])
        wait_batch(client, batch["id"], ("in_progress",))
        while len(runner.jobs_seen) < 8:
            time.sleep(0.005)
        seen_before = len(runner.jobs_seen)
        response = client.post(GEN_URL, json={"prompt": "interactive", "size": "32x32"})
        assert response.status_code == 200
        order = [job.prompt for job in runner.jobs_seen]
        lines_in_between = order.index("interactive") - seen_before
        assert lines_in_between <= 2 * 8  # max_batch_size x 1 worker x the dispatcher's feed factor
        assert client.get(f"/v1/batches/{batch['id']}").json()["status"] == "in_progress"
        assert wait_batch(client, batch["id"])["request_counts"]["completed"] == 120
