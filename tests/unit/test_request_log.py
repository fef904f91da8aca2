"""One log line per request with what it did; JSON on request; keys scrubbed from any line."""

from __future__ import annotations

import io
import json
import logging

import openai
import pytest
from fastapi.testclient import TestClient

from diffuser_api.log_format import KNOWN_NOISE, JsonFormatter, RedactKeys, log_handler
from tests.fakes import fake_app
from tests.unit.test_api import GEN, wait_ready
from tests.unit.test_auth import bearer, sdk


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path, api_keys=["sk-log-test"])) as test_client:
        wait_ready(test_client)
        yield test_client


def access_records(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "diffuser_api.access"]


def test_one_line_per_request_with_its_work(client, caplog):
    caplog.set_level(logging.INFO, logger="diffuser_api.access")
    payload = {"prompt": "x", "n": 2, "size": "32x16", "num_inference_steps": 3}
    client.post(GEN, json=payload, headers={**bearer("sk-log-test"), "x-request-id": "trace-42"})
    (record,) = access_records(caplog)
    fields = record.request
    assert fields["request_id"] == "trace-42" and fields["status"] == 200
    assert fields["key_name"].startswith("key-") and fields["model"] == "fake-model"
    assert (fields["task"], fields["size"], fields["steps"], fields["images"]) == ("generations", "32x16", 3, 2)
    assert fields["queue_wait_s"] >= 0 and fields["compute_s"] > 0
    line = record.getMessage()
    assert line.startswith("trace-42 POST /v1/images/generations 200 ")
    for part in ("key=key-", "model=fake-model", "task=generations", "size=32x16", "steps=3", "images=2",
                 "queue_wait=", "compute="):
        assert part in line
    assert "sk-log-test" not in line


def test_failed_and_refused_requests_are_logged_too(client, caplog):
    caplog.set_level(logging.INFO, logger="diffuser_api.access")
    client.post(GEN, json={"prompt": "x", "size": "13x7"}, headers=bearer("sk-log-test"))
    client.post(GEN, json={"prompt": "x"})
    bad, refused = (record.request for record in access_records(caplog))
    assert bad["status"] == 400 and bad["task"] == "generations" and "model" not in bad
    assert refused["status"] == 401 and "key_name" not in refused


def test_request_id_round_trips_through_the_sdk(client):
    images = sdk(client, "sk-log-test").images
    raw = images.with_raw_response.generate(prompt="x", size="32x32", extra_headers={"x-request-id": "mine-1"})
    assert raw.headers["x-request-id"] == "mine-1"
    with pytest.raises(openai.BadRequestError) as caught:
        images.generate(prompt="x", size="13x7", extra_headers={"x-request-id": "mine-2"})
    assert caught.value.request_id == "mine-2" and caught.value.body["request_id"] == "mine-2"


def test_json_format_has_the_request_fields_at_top_level():
    record = logging.LogRecord("diffuser_api.access", logging.INFO, __file__, 1, "req_1 GET / 200", None, None)
    record.request = {"request_id": "req_1", "status": 200, "key_name": "alice"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "req_1 GET / 200" and entry["level"] == "info"
    assert (entry["request_id"], entry["status"], entry["key_name"]) == ("req_1", 200, "alice")


@pytest.mark.parametrize(
    ("message", "args"),
    [
        ('127.0.0.1:5000 - "WebSocket /v1/stream?api_key=%s&x=1" [accepted]', ("sk-secret",)),
        ("offered subprotocols %s", (["images.v1", "openai-insecure-api-key.sk-secret"],)),
        ("header was Authorization: Bearer sk-secret", None),
    ],
)
def test_keys_are_scrubbed_from_any_log_line(message, args):
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, message, args, None)
    assert RedactKeys().filter(record)
    assert "sk-secret" not in record.getMessage() and "***" in record.getMessage()


def test_websocket_session_is_logged_with_its_work_and_never_its_key(client, caplog):
    caplog.set_level(logging.INFO, logger="diffuser_api.access")
    with client.websocket_connect("/v1/images/ws?api_key=sk-log-test") as socket:
        socket.send_json({"prompt": "x", "size": "32x16", "num_inference_steps": 3})
        while socket.receive_json()["type"] != "done":
            pass
    (record,) = [entry for entry in access_records(caplog) if entry.request["path"] == "/v1/images/ws"]
    fields = record.request
    assert (fields["task"], fields["size"], fields["steps"], fields["images"]) == ("generations", "32x16", 3, 1)
    assert fields["model"] == "fake-model" and fields["compute_s"] > 0
    assert "sk-log-test" not in record.getMessage()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_newline_in_the_path_cannot_forge_a_log_line(tmp_path, log_format):
    output = io.StringIO()
    handler = log_handler(log_format, output)
    access = logging.getLogger("diffuser_api.access")
    access.addHandler(handler)
    previous_level = access.level
    access.setLevel(logging.INFO)
    try:
        with TestClient(fake_app(tmp_path)) as client:
            wait_ready(client)
            output.truncate(0)
            output.seek(0)
            response = client.get("/v1/%0aFAKE%0d%0aLINE%e2%80%a8 x")
            assert response.status_code == 404
            assert client.get("/v1/models").status_code == 200
    finally:
        access.removeHandler(handler)
        access.setLevel(previous_level)
    lines = output.getvalue().splitlines()
    assert len(lines) == 2 and not any(line.startswith("FAKE") or line.startswith("LINE") for line in lines)
    escaped = "/v1/\\nFAKE\\r\\nLINE\\u2028 x"
    if log_format == "json":
        entry = json.loads(lines[0])
        assert entry["path"] == escaped and escaped in entry["message"]
    else:
        assert f"GET {escaped} 404" in lines[0]


def test_text_log_lines_escape_control_characters_from_any_logger():
    output = io.StringIO()
    handler = log_handler("text", output)
    record = logging.LogRecord("any", logging.WARNING, __file__, 1, "model %s\x1b[31m", ("'x\nFAKE'",), None)
    handler.handle(record)
    assert output.getvalue().count("\n") == 1
    assert "model 'x\\nFAKE'\\x1b[31m" in output.getvalue()


@pytest.mark.parametrize("noise", KNOWN_NOISE, ids=lambda noise: f"{noise.logger}: {noise.text}")
def test_known_library_noise_is_dropped_and_nothing_else(noise):
    """The same words from another logger, and the same logger's other words, stay."""
    import io

    stream = io.StringIO()
    handler = log_handler("text", stream)
    for name, message in ((noise.logger, f"before {noise.text} after"), (f"{noise.logger}.child", noise.text),
                          (noise.logger, "something else"), ("diffuser_api.x", noise.text)):
        handler.handle(logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "something else" in lines[0] and "diffuser_api.x" in lines[1]
