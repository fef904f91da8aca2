"""Streaming with the fake model: OpenAI's SSE events and the progress WebSocket."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffuser_api.engine import EngineLimits
from tests.fakes import FakeRunner, colour_of, fake_app, png_bytes, threads_calling
from tests.servers import ThreadedServer
from tests.unit.test_api import assert_envelope, assert_still_serves, wait_ready

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


def sse_events(response: httpx.Response) -> list[tuple[str | None, dict]]:
    """(event name, JSON) pairs; comments and blank lines skipped, as the SDK does."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.removeprefix("data:").strip())))
            name = None
    return events


def pixel(b64: str) -> tuple[int, ...]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").getpixel((0, 0))


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path)) as test_client:
        wait_ready(test_client)
        yield test_client


def test_generation_stream_sends_partials_then_one_completed(client):
    payload = {"prompt": "fox", "stream": True, "partial_images": 2, "num_inference_steps": 6, "seed": 4}
    with client.stream("POST", GEN, json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    types = [body["type"] for _, body in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [name for name, _ in events] == types
    partials, completed = [body for _, body in events[:2]], events[2][1]
    assert [body["partial_image_index"] for body in partials] == [0, 1]
    assert "image_index" not in completed
    for body in (*partials, completed):
        assert {"b64_json", "created_at", "size", "quality", "background", "output_format"} <= set(body)
    assert completed["usage"]["input_tokens_details"] == {"text_tokens": 0, "image_tokens": 0}
    assert pixel(completed["b64_json"]) == colour_of("fox", 4)
    assert pixel(partials[0]["b64_json"]) != pixel(completed["b64_json"])
    assert pixel(partials[0]["b64_json"]) != pixel(partials[1]["b64_json"])


@pytest.mark.parametrize(("device", "encoder_thread"), [("cpu", "worker-"), ("fake", "codec")])
def test_previews_are_encoded_between_steps_on_a_cpu_worker_and_by_the_codec_pool_elsewhere(
    tmp_path, monkeypatch, device, encoder_thread
):
    from diffuser_api.service.images import ImageService

    threads = threads_calling(monkeypatch, ImageService, "_encode_preview")
    payload = {"prompt": "fox", "stream": True, "partial_images": 2, "num_inference_steps": 6, "seed": 4}
    with TestClient(fake_app(tmp_path, device=device)) as client:
        wait_ready(client)
        with client.stream("POST", GEN, json=payload) as response:
            events = [body for _, body in sse_events(response)]
    partials = [body for body in events if body["type"].endswith("partial_image")]
    assert [body["partial_image_index"] for body in partials] == [0, 1]
    assert len({pixel(body["b64_json"]) for body in partials}) == 2
    assert len(threads) == 2 and all(name.startswith(encoder_thread) for name in threads), threads


@pytest.mark.parametrize(("device", "encoder_thread"), [("cpu", "encode-"), ("fake", "codec")])
@pytest.mark.parametrize("stream", [False, True])
def test_final_images_are_encoded_on_a_cpu_worker_and_by_the_codec_pool_elsewhere(
    tmp_path, monkeypatch, device, encoder_thread, stream
):
    from diffuser_api.service.images import ImageService

    threads = threads_calling(monkeypatch, ImageService, "_encode_result")
    payload = {"prompt": "fox", "n": 2, "num_inference_steps": 2, "seed": 4, "output_format": "webp"}
    with TestClient(fake_app(tmp_path, device=device)) as client:
        wait_ready(client)
        if stream:
            with client.stream("POST", GEN, json=payload | {"stream": True}) as response:
                images = [body["b64_json"] for _, body in sse_events(response)]
        else:
            images = [item["b64_json"] for item in client.post(GEN, json=payload).json()["data"]]
    expected = sorted([colour_of("fox", 4), colour_of("fox", 5)])
    for got, want in zip(sorted(pixel(image) for image in images), expected, strict=True):
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 3  # WebP is lossy
    assert all(base64.b64decode(image)[8:12] == b"WEBP" for image in images)  # the request's format
    assert len(threads) == 2 and all(name.startswith(encoder_thread) for name in threads), threads


def test_stream_with_several_images_tags_each_event(client):
    payload = {"prompt": "fox", "stream": True, "partial_images": 1, "n": 2, "num_inference_steps": 4}
    with client.stream("POST", GEN, json=payload) as response:
        events = [body for _, body in sse_events(response)]
    completed = [body for body in events if body["type"].endswith("completed")]
    partials = [body for body in events if body["type"].endswith("partial_image")]
    assert sorted(body["image_index"] for body in completed) == [0, 1]
    assert sorted(body["image_index"] for body in partials) == [0, 1]


def test_partial_images_zero_streams_only_completed(client):
    with client.stream("POST", GEN, json={"prompt": "x", "stream": True, "partial_images": 0}) as response:
        assert [body["type"] for _, body in sse_events(response)] == ["image_generation.completed"]


def test_edit_stream_uses_edit_event_types(client):
    files = {"image": ("a.png", png_bytes(), "image/png")}
    data = {"prompt": "x", "stream": "true", "partial_images": "1", "num_inference_steps": "4"}
    with client.stream("POST", EDIT, data=data, files=files) as response:
        types = [body["type"] for _, body in sse_events(response)]
    assert types == ["image_edit.partial_image", "image_edit.completed"]


def test_invalid_streamed_request_is_a_plain_error(client):
    response = client.post(GEN, json={"prompt": "x", "stream": True, "size": "13x7"})
    assert_envelope(response, 400, "size")
    assert response.headers["content-type"].startswith("application/json")


def test_failure_after_the_stream_started_is_an_error_event(tmp_path):
    runner = FakeRunner(fail_on={"explode": RuntimeError("fake pipeline exploded")})
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        with client.stream("POST", GEN, json={"prompt": "explode", "stream": True}) as response:
            events = sse_events(response)
        name, body = events[-1]
        assert name == "error" and body["error"]["type"] == "server_error"
        assert {"message", "type", "param", "code"} <= set(body["error"])
        assert client.post(GEN, json={"prompt": "fine"}).status_code == 200


def test_keep_alive_comments_while_waiting(tmp_path):
    gate = threading.Event()
    with TestClient(fake_app(tmp_path, FakeRunner(gate=gate), stream_ping_s=0.05)) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        # The model waits until a ping came (or 10 s, so a stream without pings fails, not hangs).
        fallback = threading.Timer(10.0, gate.set)
        fallback.start()
        lines = []
        with client.stream("POST", GEN, json={"prompt": "x", "stream": True}) as response:
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith(": ping"):
                    gate.set()
        fallback.cancel()
    assert any(line.startswith(": ping") for line in lines)
    assert any(line.startswith("event: image_generation.completed") for line in lines)


def test_websocket_reports_steps_then_the_image(client):
    with client.websocket_connect("/v1/images/ws") as socket:
        socket.send_json({"prompt": "fox", "num_inference_steps": 5, "partial_images": 1, "seed": 9})
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(socket.receive_json())
    steps = [message["step"] for message in messages if message["type"] == "progress"]
    assert steps == [1, 2, 3, 4, 5]
    assert {message["total_steps"] for message in messages if message["type"] == "progress"} == {5}
    assert sum(message["type"] == "partial_image" for message in messages) == 1
    completed = [message for message in messages if message["type"] == "completed"]
    assert len(completed) == 1 and completed[0]["seed"] == 9
    assert pixel(completed[0]["b64_json"]) == colour_of("fox", 9)


def test_websocket_edit_and_bad_request(client):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    with client.websocket_connect("/v1/images/ws") as socket:
        socket.send_json({"endpoint": "edits", "prompt": "x", "images": [{"image_url": data_url}]})
        messages = [socket.receive_json() for _ in range(6)]
    assert messages[-1]["type"] == "done" and messages[-2]["type"] == "completed"
    with client.websocket_connect("/v1/images/ws") as socket:
        socket.send_json({"prompt": "x", "size": "13x7"})
        error = socket.receive_json()
    assert error["type"] == "error" and error["error"]["param"] == "size"
    with client.websocket_connect("/v1/images/ws") as socket:
        socket.send_json({"prompt": "x", "num_inference_steps": "4"})  # a JSON message is strict, as the route
        error = socket.receive_json()
    assert error["type"] == "error" and (error["error"]["param"], error["error"]["code"]) == (
        "num_inference_steps", "invalid_type")


@pytest.mark.parametrize("send", [lambda socket: socket.send_text("not json"),
                                  lambda socket: socket.send_bytes(b'{"prompt": "x"}')], ids=["text", "binary"])
def test_a_websocket_message_that_is_not_json_text_is_the_client_s_error(client, send):
    with client.websocket_connect("/v1/images/ws") as socket:
        send(socket)
        error = socket.receive_json()
    assert error["type"] == "error"
    assert (error["error"]["type"], error["error"]["code"]) == ("invalid_request_error", "invalid_json")
    assert_still_serves(client)


def test_websocket_reports_queue_position(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    with TestClient(fake_app(tmp_path, runner)) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        blocker = threading.Thread(target=lambda: client.post(GEN, json={"prompt": "first", "size": "64x64"}))
        blocker.start()
        time.sleep(0.2)
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"prompt": "second"})
            first = socket.receive_json()
            gate.set()
            while socket.receive_json()["type"] != "done":
                pass
        blocker.join(10)
    assert first == {"type": "queued", "position": 0}


def test_dropping_the_stream_stops_the_work(tmp_path):
    """A client that closes the SSE stream cancels its job at the next step."""
    runner = FakeRunner(step_delay_s=0.02)
    with ThreadedServer(fake_app(tmp_path, runner, max_steps=200)) as server:
        server.wait_ready()
        payload = {"prompt": "long", "stream": True, "num_inference_steps": 200}
        with httpx.stream("POST", f"{server.base_url}{GEN}", json=payload, timeout=10) as response:
            assert response.status_code == 200
            deadline = time.monotonic() + 5
            while not runner.started("long") or runner.batch_of("long").steps < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        dropped_at = runner.batch_of("long").steps
        time.sleep(0.5)
        assert runner.batch_of("long").steps <= dropped_at + 2  # stopped within a step or so of noticing
        assert httpx.post(f"{server.base_url}{GEN}", json={"prompt": "next"}, timeout=10).status_code == 200


def test_websocket_needs_the_key_when_keys_are_on(tmp_path):
    from starlette.websockets import WebSocketDisconnect

    with TestClient(fake_app(tmp_path, api_keys=["sk-right"])) as client:
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/images/ws") as socket:
                socket.send_json({"prompt": "x"})
                socket.receive_json()
        for url, protocols in (("/v1/images/ws?api_key=sk-right", None),
                               ("/v1/images/ws", ["openai-insecure-api-key.sk-right", "images.v1"])):
            with client.websocket_connect(url, subprotocols=protocols) as socket:
                socket.send_json({"prompt": "x", "num_inference_steps": 2})
                messages = []
                while not messages or messages[-1]["type"] not in ("done", "error"):
                    messages.append(socket.receive_json())
                assert messages[-1]["type"] == "done"
                if protocols:
                    assert socket.accepted_subprotocol == "images.v1"


def test_split_request_streams_every_image_with_its_own_index_over_real_http(tmp_path):
    """n=3 with one image per batch runs as three batches; SSE still tags each image's
    partials and result with its index, and the seeds come back in order."""
    runner = FakeRunner()
    with ThreadedServer(fake_app(tmp_path, runner, limits=EngineLimits(max_batch_size=1))) as server:
        server.wait_ready()
        payload = {"prompt": "fox", "stream": True, "partial_images": 1, "n": 3, "num_inference_steps": 4, "seed": 5}
        with httpx.stream("POST", f"{server.base_url}{GEN}", json=payload, timeout=10) as response:
            assert response.status_code == 200
            events = [body for _, body in sse_events(response)]
    assert [batch.images for batch in runner.batches] == [1, 1, 1]
    partials = [body for body in events if body["type"].endswith("partial_image")]
    completed = [body for body in events if body["type"].endswith("completed")]
    assert [(body["image_index"], body["partial_image_index"]) for body in partials] == [(0, 0), (1, 0), (2, 0)]
    assert [(body["image_index"], body["seed"]) for body in completed] == [(0, 5), (1, 6), (2, 7)]
    assert [pixel(body["b64_json"]) for body in completed] == [colour_of("fox", seed) for seed in (5, 6, 7)]


def test_split_request_over_a_real_websocket_reports_one_rising_step_count(tmp_path):
    from websockets.sync.client import connect

    runner = FakeRunner()
    with ThreadedServer(fake_app(tmp_path, runner, limits=EngineLimits(max_batch_size=2))) as server:
        server.wait_ready()
        with connect(f"{server.base_url.replace('http', 'ws')}/v1/images/ws", open_timeout=5) as socket:
            socket.send(json.dumps({"prompt": "fox", "n": 3, "num_inference_steps": 3, "partial_images": 1}))
            messages = []
            while not messages or messages[-1]["type"] not in ("done", "error"):
                messages.append(json.loads(socket.recv(timeout=10)))
    progress = [message for message in messages if message["type"] == "progress"]
    assert [message["step"] for message in progress] == list(range(1, 7))
    assert {message["total_steps"] for message in progress} == {6}
    partials = [message["image_index"] for message in messages if message["type"] == "partial_image"]
    assert partials == [0, 1, 2]
    assert [message["image_index"] for message in messages if message["type"] == "completed"] == [0, 1, 2]
    assert messages[-1] == {"type": "done"}
