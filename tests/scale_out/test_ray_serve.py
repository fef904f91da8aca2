"""The Ray Serve application as a user runs it: ``diffuser-api serve --ray-address`` (a real
process) joins a small Ray cluster started here and deploys two tiny models, one with two
replicas; the official openai SDK, httpx and websockets talk to its HTTP port.

One Ray session for the module (2 CPUs, no dashboard, a small object store, a short temp
directory: unix socket paths have a length limit), shut down at the end. The test process
also reaches the model deployments' handles, to ask a replica for its own figures (which
replica ran work, the steps it ran) and to kill one.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import TINY_CACHE, free_port
from tests.fakes import FakeRunner, fake_app, png_bytes

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
websockets_sync = pytest.importorskip("websockets.sync.client")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

APP = "diffuser-api"
MODELS_FILE = """\
models:
  - id: tiny-a
    source: tiny-sd
    ray:
      num_replicas: 2
      ray_actor_options: {num_cpus: 0.25}
  - id: tiny-b
    source: tiny-sd
    ray:
      ray_actor_options: {num_cpus: 0.25}
"""
FAST = {"num_inference_steps": 2}
ENVELOPE_KEYS = {"message", "type", "param", "code", "request_id"}


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
    return result


class RayServer:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def replica_figures(self, model_id: str, replicas: int = 1) -> dict[str, dict[str, Any]]:
        """Actor name -> figures of ``replicas`` replicas (a new handle learns of them one by one)."""
        handle = serve.get_deployment_handle(f"model-{model_id}", app_name=APP)
        figures: dict[str, dict[str, Any]] = {}

        def reached_all() -> bool:
            for answer in [handle.figures.remote() for _ in range(4 * replicas)]:
                result = answer.result()
                figures[result["actor_name"]] = result
            return len(figures) >= replicas

        wait_until(reached_all, f"{replicas} replicas of {model_id} to answer", timeout_s=30)
        return figures

    def generate_ok(self, model: str = "tiny-a") -> None:
        result = self.client.images.generate(model=model, prompt="after", size="64x64", extra_body=FAST)
        assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)


@pytest.fixture(scope="module")
def ray_server() -> Iterator[RayServer]:
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, _temp_dir=temp,
             logging_level="warning", log_to_driver=False)
    models_file = Path(temp) / "models.yaml"
    models_file.write_text(MODELS_FILE)
    port = free_port()
    env = {
        **os.environ,
        "DIFFUSER_MODELS_FILE": str(models_file),
        "DIFFUSER_CACHE_DIR": str(TINY_CACHE),
        "DIFFUSER_STORAGE_DIR": str(Path(temp) / "images"),
        "DIFFUSER_PORT": str(port),
        "DIFFUSER_ADMIN_OPEN": "true",
        "DIFFUSER_REQUEST_TIMEOUT_S": "120",
    }
    address = ray.get_runtime_context().gcs_address
    process = subprocess.Popen([sys.executable, "-m", "diffuser_api.cli", "serve", "--ray-address", address], env=env)
    server = RayServer(f"http://127.0.0.1:{port}")
    try:
        def healthy() -> bool:
            assert process.poll() is None, "diffuser-api serve --ray exited"
            try:
                return httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, "the Ray application to serve /health", timeout_s=240)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
            serve.shutdown()
            ray.shutdown()


def test_both_models_are_listed_ready_once_their_replicas_run(ray_server):
    def statuses() -> dict[str, str]:
        return {model["id"]: model["status"] for model in httpx.get(f"{ray_server.base_url}/v1/models").json()["data"]}

    assert set(statuses().values()) <= {"ready", "loading"}  # /health needs only the default model
    wait_until(lambda: statuses() == {"tiny-a": "ready", "tiny-b": "ready"}, "both models ready", timeout_s=60)


def test_concurrent_generations_through_the_sdk_reach_both_replicas(ray_server):
    before = ray_server.replica_figures("tiny-a", replicas=2)

    def generate(seed: int) -> tuple[int, int]:
        result = ray_server.client.images.generate(
            model="tiny-a", prompt=f"fox {seed}", size="64x64", extra_body={**FAST, "seed": seed}
        )
        return Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(generate, range(16))) == [(64, 64)] * 16
    after = ray_server.replica_figures("tiny-a", replicas=2)
    for name, figures in after.items():
        assert figures["steps_done"] > before[name]["steps_done"], f"replica {name} took no work"


def test_edit_and_variation(ray_server):
    image = png_bytes((64, 64), (200, 30, 30))
    edited = ray_server.client.images.edit(model="tiny-b", image=("in.png", image, "image/png"), prompt="blue",
                                           extra_body=FAST)
    varied = ray_server.client.images.create_variation(model="tiny-a", image=("in.png", image, "image/png"),
                                                       size="64x64", extra_body=FAST)
    for result in (edited, varied):
        assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)


def test_streamed_generation_sends_partial_images(ray_server):
    events = list(ray_server.client.images.generate(model="tiny-a", prompt="fox", size="64x64", stream=True,
                                                    partial_images=2, extra_body={"num_inference_steps": 4}))
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json))).size == (64, 64)


def test_websocket_session_reports_progress_and_the_image(ray_server):
    url = ray_server.base_url.replace("http://", "ws://") + "/v1/images/ws"
    with websockets_sync.connect(url) as socket:
        socket.send(json.dumps({"model": "tiny-b", "prompt": "fox", "size": "64x64", "num_inference_steps": 3}))
        received = []
        while not received or received[-1]["type"] not in ("done", "error"):
            received.append(json.loads(socket.recv(timeout=60)))
    assert [message["step"] for message in received if message["type"] == "progress"] == [1, 2, 3]
    assert [message["type"] for message in received[-2:]] == ["completed", "done"]


def test_a_bad_request_has_the_single_process_envelope(ray_server, tmp_path):
    bodies = [{"prompt": "x", "size": "64x64", "stepz": 3}, {"prompt": "x", "size": "13x7"}]
    with fake_app_client(tmp_path) as single:
        for body in bodies:
            on_ray = httpx.post(f"{ray_server.base_url}/v1/images/generations", json=body, timeout=30)
            alone = single.post("/v1/images/generations", json=body)
            assert on_ray.status_code == alone.status_code == 400
            error = on_ray.json()["error"]
            assert set(error) == ENVELOPE_KEYS and error["request_id"] == on_ray.headers["x-request-id"]
            expected = alone.json()["error"]
            assert (error["type"], error["param"], error["code"]) == (expected["type"], expected["param"],
                                                                      expected["code"])
            if "stepz" in body:
                assert error["message"] == expected["message"]
    ray_server.generate_ok()


def fake_app_client(tmp_path: Path):
    from fastapi.testclient import TestClient

    return TestClient(fake_app(tmp_path, FakeRunner()))


def test_an_abandoned_request_stops_on_its_replica(ray_server):
    """tiny-b has one replica: its step counter shows the work stop once the client leaves."""
    before = ray_server.replica_figures("tiny-b").popitem()[1]
    body = {"model": "tiny-b", "prompt": "long", "size": "64x64", "num_inference_steps": 100,
            "stream": True, "partial_images": 3}
    with httpx.stream("POST", f"{ray_server.base_url}/v1/images/generations", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # the first partial image: the replica is running it; leave
    # One partial image comes at step 25 at the latest; the work must stop well before 100.
    def stopped() -> dict[str, Any] | None:
        figures = ray_server.replica_figures("tiny-b").popitem()[1]
        return figures if figures["in_flight"] == 0 and figures["batches"].get("abandoned") else None

    figures = wait_until(stopped, "the replica to abandon the batch", timeout_s=30)
    assert figures["steps_done"] - before["steps_done"] < 100
    ray_server.generate_ok("tiny-b")


def test_metrics_on_the_ingress_include_the_replicas_batches(ray_server):
    ray_server.generate_ok()
    text = httpx.get(f"{ray_server.base_url}/metrics", timeout=10).text
    ok_batches = [line for line in text.splitlines()
                  if line.startswith('diffuser_batches_total{model="tiny-a",outcome="ok"}')]
    assert ok_batches and float(ok_batches[0].split()[-1]) > 0


def test_a_replica_killed_mid_request_is_a_retryable_503_and_the_next_request_succeeds(ray_server):
    outcome: dict[str, httpx.Response] = {}
    body = {"model": "tiny-a", "prompt": "long", "size": "256x256", "num_inference_steps": 100}
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "response", httpx.post(f"{ray_server.base_url}/v1/images/generations", json=body, timeout=120)))
    thread.start()

    def busy_replica() -> str | None:
        return next((name for name, figures in ray_server.replica_figures("tiny-a", replicas=2).items()
                     if figures["in_flight"]), None)

    victim = wait_until(busy_replica, "a replica to run the request", timeout_s=30)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    thread.join(timeout=60)
    response = outcome["response"]
    assert response.status_code == 503 and float(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert set(error) == ENVELOPE_KEYS and error["type"] == "server_error"
    assert "ray" not in error["message"].lower() or "replica" in error["message"]
    ray_server.generate_ok()


def test_admin_unload_scales_a_model_to_zero_and_load_brings_it_back(ray_server):
    models = f"{ray_server.base_url}/v1/models/tiny-b"

    def status() -> str:
        return httpx.get(models, timeout=10).json()["status"]

    assert httpx.post(f"{models}/unload", timeout=10).status_code == 202
    wait_until(lambda: status() == "unloaded", "tiny-b to have no replica", timeout_s=60)
    assert httpx.post(f"{models}/load", timeout=10).status_code == 202
    wait_until(lambda: status() == "ready", "tiny-b to have a replica again", timeout_s=120)
    ray_server.generate_ok("tiny-b")
