"""/metrics moves by exactly what was asked of the server, and each app counts on its own."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from diffuser_api.domain.devices import DeviceMemory
from diffuser_api.engine import EngineLimits
from tests.fakes import FakeRunner, fake_app, fake_models_app
from tests.unit.test_api import GEN, wait_ready
from tests.unit.test_models_api import WEIGHTS, three_models


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before, after, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_match_the_requests_sent(tmp_path):
    with TestClient(fake_app(tmp_path)) as client:
        wait_ready(client)
        before = scrape(client)
        assert client.post(GEN, json={"prompt": "a", "n": 1, "num_inference_steps": 3}).status_code == 200
        assert client.post(GEN, json={"prompt": "b", "n": 3, "num_inference_steps": 5}).status_code == 200
        assert client.post(GEN, json={"prompt": "c", "size": "13x7"}).status_code == 400
        assert client.get("/v1/models").status_code == 200
        after = scrape(client)

    gen = {"endpoint": "/v1/images/generations"}
    assert moved(before, after, "diffuser_requests_total", **gen, model="fake-model", status="200") == 2
    assert moved(before, after, "diffuser_requests_total", **gen, model="", status="400") == 1
    assert moved(before, after, "diffuser_requests_total", endpoint="/v1/models", model="", status="200") == 1
    assert moved(before, after, "diffuser_request_duration_seconds_count", **gen) == 3
    assert moved(before, after, "diffuser_images_generated_total", model="fake-model") == 4
    assert moved(before, after, "diffuser_denoising_steps_total", model="fake-model") == 8
    assert moved(before, after, "diffuser_batches_total", model="fake-model", outcome="ok") == 2
    assert moved(before, after, "diffuser_batch_size_images_count", model="fake-model") == 2
    assert moved(before, after, "diffuser_batch_size_images_sum", model="fake-model") == 4
    assert moved(before, after, "diffuser_queue_wait_seconds_count", model="fake-model") == 2
    assert moved(before, after, "diffuser_compute_seconds_count", model="fake-model") == 2
    assert value(after, "diffuser_steps_per_second", model="fake-model") > 0
    assert value(after, "diffuser_model_ready", model="fake-model") == 1
    assert value(after, "diffuser_model_load_seconds", model="fake-model") >= 0
    assert ("diffuser_model_load_seconds", (("model", "fake-model"),)) in after
    assert value(after, "diffuser_queue_depth", model="fake-model") == 0
    # Only the scrape itself is in flight while it is being answered.
    assert value(after, "diffuser_requests_in_flight") == 1


def test_random_paths_do_not_create_series(tmp_path):
    with TestClient(fake_app(tmp_path)) as client:
        wait_ready(client)
        for index in range(3):
            client.get(f"/v1/images/files/{index}-nope.png")
            client.get(f"/nothing/{index}")
        after = scrape(client)
    endpoints = {dict(labels).get("endpoint") for name, labels in after if name == "diffuser_requests_total"}
    assert endpoints == {"/health", "/v1/images/files/{name}", "unmatched"}
    assert value(after, "diffuser_requests_total", endpoint="unmatched", model="", status="404") == 3


def test_queue_depth_and_in_flight_while_busy(tmp_path):
    gate = threading.Event()
    limits = EngineLimits(max_batch_size=1, request_timeout_s=10)
    with TestClient(fake_app(tmp_path, FakeRunner(gate=gate), limits=limits)) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        threads = [threading.Thread(target=client.post, args=(GEN,), kwargs={"json": {"prompt": p}}) for p in "ab"]
        for thread in threads:
            thread.start()

        def observed() -> tuple[float, float, float]:
            samples = scrape(client)
            return (
                value(samples, "diffuser_queue_depth", model="fake-model"),
                value(samples, "diffuser_requests_in_flight"),  # two generations and the scrape
                value(samples, "diffuser_busy_workers", model="fake-model"),
            )

        # The requests arrive in their own time: wait for one running and one queued.
        deadline = time.monotonic() + 5
        while (state := observed()) != (1, 3, 1):
            assert time.monotonic() < deadline, f"never saw one running and one queued: {state}"
        gate.set()
        for thread in threads:
            thread.join(10)


def test_each_app_has_its_own_registry(tmp_path):
    with TestClient(fake_app(tmp_path / "one")) as one, TestClient(fake_app(tmp_path / "two")) as two:
        wait_ready(one)
        wait_ready(two)
        for _ in range(3):
            one.post(GEN, json={"prompt": "x"})
        gen = {"endpoint": "/v1/images/generations", "model": "fake-model", "status": "200"}
        assert value(scrape(one), "diffuser_requests_total", **gen) == 3
        assert value(scrape(two), "diffuser_requests_total", **gen) == 0


def test_device_memory_from_the_probe_the_models_layer_hands_in(tmp_path):
    from diffuser_api.api.app import create_app

    app = fake_app(tmp_path)

    def probe() -> list[DeviceMemory]:
        return [DeviceMemory("cuda:0", 100, 200, 1000), DeviceMemory("cuda:1", 1, 2, 3)]

    app = create_app(app.state.settings, app.state.registry, device_memory=probe)
    with TestClient(app) as client:
        samples = scrape(client)
    assert value(samples, "diffuser_gpu_memory_allocated_bytes", device="cuda:0") == 100
    assert value(samples, "diffuser_gpu_memory_reserved_bytes", device="cuda:0") == 200
    assert value(samples, "diffuser_gpu_memory_total_bytes", device="cuda:1") == 3


def test_no_gpu_memory_series_without_a_probe(tmp_path):
    with TestClient(fake_app(tmp_path)) as client:
        assert "diffuser_gpu_memory" not in client.get("/metrics").text


def test_per_model_status_loads_evictions_and_memory(tmp_path):
    models = three_models()
    with TestClient(fake_models_app(tmp_path, models, max_loaded_models=2)) as client:
        wait_ready(client)
        for name in ("model-b", "model-c"):  # room for two, model-a pinned: model-b goes to host memory
            assert client.post(GEN, json={"prompt": "x", "model": name}).status_code == 200
        samples = scrape(client)
    statuses = {dict(labels)["model"]: dict(labels)["status"]
                for (name, labels), sample in samples.items() if name == "diffuser_model_status" and sample == 1}
    assert statuses == {"model-a": "ready", "model-b": "offloaded", "model-c": "ready"}
    assert sum(sample for (name, labels), sample in samples.items()
               if name == "diffuser_model_status" and dict(labels)["model"] == "model-b") == 1
    for model in ("model-a", "model-b", "model-c"):
        assert value(samples, "diffuser_model_loads_total", model=model) == 1
        assert ("diffuser_model_load_seconds", (("model", model),)) in samples
        assert ("diffuser_queue_depth", (("model", model),)) in samples
    assert value(samples, "diffuser_model_evictions_total", model="model-b", kind="host") == 1
    assert ("diffuser_model_evictions_total", (("kind", "released"), ("model", "model-b"))) in samples
    assert value(samples, "diffuser_model_evictions_total", model="model-a", kind="host") == 0
    resident = {dict(labels)["model"]: (dict(labels)["device"], sample)
                for (name, labels), sample in samples.items() if name == "diffuser_model_resident_bytes"}
    assert resident == {"model-a": ("fake", WEIGHTS), "model-c": ("fake", 3 * WEIGHTS)}
    assert value(samples, "diffuser_model_ready", model="model-b") == 0
