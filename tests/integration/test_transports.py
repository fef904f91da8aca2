"""Every transport through uvicorn on a real port, driven by the client libraries users use.

The fake model (no torch) makes results exact: its colour is a function of prompt and seed.
The WebSocket is also tested through the real ``diffuser-api serve`` process, where it once
answered 404 because no WebSocket library was installed. The tiny-sd SDK tests
(test_openai_sdk.py, test_streaming_sdk.py) check the same transports with real pixels.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import websockets
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from tests.conftest import LiveServer
from tests.fakes import FakeRunner, colour_of, fake_app, png_bytes
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
VAR = "/v1/images/variations"


@pytest.fixture(scope="module")
def gate() -> threading.Event:
    """Held shut by a test to keep the worker busy; open otherwise."""
    opened = threading.Event()
    opened.set()
    return opened


@pytest.fixture(scope="module")
def runner(gate: threading.Event) -> FakeRunner:
    return FakeRunner(gate=gate, step_delay_s=0.01)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, runner: FakeRunner) -> Iterator[ThreadedServer]:
    # max_steps: the cancellation test needs a request long enough to be closed mid-way.
    with ThreadedServer(fake_app(tmp_path_factory.mktemp("transports"), runner, max_steps=500)) as running:
        running.wait_ready()
        yield running


@pytest.fixture()
def client(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=30)


def colour(b64: str) -> tuple[int, ...]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").getpixel((0, 0))


def test_json_through_the_sdk(client):
    result = client.images.generate(prompt="fox", size="32x16", n=2, extra_body={"seed": 3})
    assert [colour(item.b64_json) for item in result.data] == [colour_of("fox", 3), colour_of("fox", 4)]


def test_multipart_through_the_sdk(client, runner):
    result = client.images.edit(image=("a.png", png_bytes((40, 24), (1, 2, 3)), "image/png"), prompt="blue")
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (40, 24)
    assert runner.jobs_seen[-1].images[0].getpixel((0, 0)) == (1, 2, 3)
    result = client.images.create_variation(image=("b.png", png_bytes((32, 32), (4, 5, 6)), "image/png"))
    assert len(result.data) == 1 and runner.jobs_seen[-1].images[0].getpixel((0, 0)) == (4, 5, 6)


def test_multipart_parts_without_filename_through_httpx(server, runner):
    """As ``files={"image": (None, data, type)}`` sends them: the bytes say what they are."""
    files = [
        ("image", (None, png_bytes((40, 24), (7, 8, 9)), "application/octet-stream")),
        ("mask", (None, png_bytes((40, 24), (0, 0, 0, 0), "RGBA"), "application/octet-stream")),
    ]
    response = httpx.post(f"{server.base_url}{EDIT}", data={"prompt": "masked"}, files=files, timeout=30)
    assert response.status_code == 200, response.text
    job = runner.jobs_seen[-1]
    assert job.images[0].getpixel((0, 0)) == (7, 8, 9) and job.mask.getpixel((0, 0)) == 255
    lying = {"image[]": ("notes.txt", png_bytes((32, 32), (10, 11, 12)), "text/plain")}
    response = httpx.post(f"{server.base_url}{VAR}", files=lying, timeout=30)
    assert response.status_code == 200, response.text
    assert runner.jobs_seen[-1].images[0].getpixel((0, 0)) == (10, 11, 12)


def test_sse_through_the_sdk(client):
    events = list(client.images.generate(prompt="fox", size="32x32", stream=True, partial_images=2,
                                         extra_body={"seed": 5, "num_inference_steps": 4}))
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert colour(events[-1].b64_json) == colour_of("fox", 5)


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/images/ws"


def messages_until_closed(socket: ClientConnection) -> list[dict]:
    received = []
    try:
        while True:
            received.append(json.loads(socket.recv(timeout=30)))
    except websockets.exceptions.ConnectionClosed:
        return received


def test_websocket_session_reports_queue_progress_and_image(server, runner, gate):
    gate.clear()  # a first request holds the worker, so the session starts queued
    holder = threading.Thread(target=lambda: httpx.post(f"{server.base_url}{GEN}", json={"prompt": "first"},
                                                        timeout=30))
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while not runner.started("first"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with connect(ws_url(server.base_url)) as socket:
            socket.send(json.dumps({"prompt": "fox", "num_inference_steps": 3, "seed": 9}))
            first = json.loads(socket.recv(timeout=10))
            gate.set()
            received = [first, *messages_until_closed(socket)]
            assert socket.close_code == 1000
    finally:
        gate.set()
        holder.join(30)
    assert received[0] == {"type": "queued", "position": 0}
    assert [message["step"] for message in received if message["type"] == "progress"] == [1, 2, 3]
    assert [message["type"] for message in received[-2:]] == ["completed", "done"]
    assert colour(received[-2]["b64_json"]) == colour_of("fox", 9) and received[-2]["seed"] == 9


def test_websocket_refuses_a_bad_request_with_the_envelope(server):
    with connect(ws_url(server.base_url)) as socket:
        socket.send(json.dumps({"prompt": "x", "size": "13x7"}))
        received = messages_until_closed(socket)
        assert socket.close_code == 1008
    error = received[0]["error"]
    assert received[0]["type"] == "error" and len(received) == 1
    assert {"message", "type", "param", "code", "request_id"} <= set(error)
    assert error["param"] == "size" and error["request_id"]
    with connect(ws_url(server.base_url)) as socket:  # still serving
        socket.send(json.dumps({"prompt": "after", "num_inference_steps": 2}))
        assert messages_until_closed(socket)[-1]["type"] == "done"


def test_closing_the_websocket_cancels_the_work(server, runner):
    with connect(ws_url(server.base_url)) as socket:
        socket.send(json.dumps({"prompt": "long", "num_inference_steps": 500}))
        while json.loads(socket.recv(timeout=10)).get("step", 0) < 3:
            pass
    closed_at = runner.batch_of("long").steps
    time.sleep(0.3)
    assert runner.batch_of("long").steps <= closed_at + 3  # stopped within a step or so of noticing
    assert runner.batch_of("long").finished_at is not None
    response = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "next"}, timeout=30)
    assert response.status_code == 200


def test_websocket_through_the_real_serve_process(tiny_sd_server: LiveServer):
    """The CLI's uvicorn has a WebSocket implementation and takes messages as large as an edit body."""
    with connect(ws_url(tiny_sd_server.base_url), open_timeout=30) as socket:
        socket.send(json.dumps({"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 1}))
        received = messages_until_closed(socket)
        assert socket.close_code == 1000
    assert [message["type"] for message in received[-2:]] == ["completed", "done"]
    assert Image.open(io.BytesIO(base64.b64decode(received[-2]["b64_json"]))).size == (64, 64)
    # Over uvicorn's own 16 MiB message default, under max_edit_bytes: the server reads it and
    # refuses the image by its own cap (this server's max_upload_bytes is 256 KiB) with the envelope.
    image = "data:image/png;base64," + base64.b64encode(png_bytes() + b"\0" * 13 * 1024 * 1024).decode()
    with connect(ws_url(tiny_sd_server.base_url), open_timeout=30, max_size=None) as socket:
        socket.send(json.dumps({"endpoint": "edits", "prompt": "x", "images": [{"image_url": image}]}))
        received = messages_until_closed(socket)
        assert socket.close_code == 1008
    assert received[0]["error"]["code"] == "payload_too_large" and received[0]["error"]["param"] == "images"
