"""``/v1/models`` with statuses, ``/v1/models/{id}`` with where a model is, ``/health?model=``,
and the loading feedback of streams, for several fake models in one server."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeModel, FakeRunner, colour_of, fake_models_app
from tests.servers import ThreadedServer
from tests.unit.test_api import GEN, assert_envelope, wait_ready
from tests.unit.test_streaming import pixel

WEIGHTS = 1000


def three_models() -> list[FakeModel]:
    return [
        FakeModel("model-a", FakeRunner("a#0"), pinned=True, weight_bytes=WEIGHTS),
        FakeModel("model-b", FakeRunner("b#0"), aliases=("b-alias",), weight_bytes=2 * WEIGHTS),
        FakeModel("model-c", FakeRunner("c#0"), weight_bytes=3 * WEIGHTS),
    ]


def statuses(client: TestClient) -> dict[str, str]:
    listed = client.get("/v1/models")
    assert listed.status_code == 200
    return {card["id"]: card["status"] for card in listed.json()["data"]}


def wait_status(client: TestClient, model_id: str, status: str, headers: dict[str, str] | None = None) -> dict:
    deadline = time.monotonic() + 10
    while (details := client.get(f"/v1/models/{model_id}", headers=headers).json())["status"] != status:
        assert time.monotonic() < deadline, f"{model_id} never became {status}: {details}"
        time.sleep(0.01)
    return details


def assert_still_serves(client: TestClient, model: str = "model-a") -> None:
    response = client.post(GEN, json={"prompt": "still here", "size": "32x32", "model": model})
    assert response.status_code == 200, response.text


def test_statuses_follow_loads_and_evictions(tmp_path):
    models = three_models()
    with TestClient(fake_models_app(tmp_path, models, max_loaded_models=2)) as client:
        wait_ready(client)
        assert statuses(client) == {"model-a": "ready", "model-b": "unloaded", "model-c": "unloaded"}
        assert client.post(GEN, json={"prompt": "x", "model": "b-alias"}).status_code == 200
        assert statuses(client) == {"model-a": "ready", "model-b": "ready", "model-c": "unloaded"}
        # Room for two, model-a pinned: model-b goes to the warm tier (the fake device can offload).
        assert client.post(GEN, json={"prompt": "x", "model": "model-c"}).status_code == 200
        assert statuses(client) == {"model-a": "ready", "model-b": "offloaded", "model-c": "ready"}


def test_details_of_a_loaded_and_a_cold_model(tmp_path):
    models = three_models()
    with TestClient(fake_models_app(tmp_path, models)) as client:
        wait_ready(client)
        loaded = client.get("/v1/models/model-a").json()
        assert {key: loaded[key] for key in ("id", "object", "owned_by", "status", "devices", "resident_bytes",
                                             "pinned", "loads", "evictions", "queue_depth")} == {
            "id": "model-a", "object": "model", "owned_by": "diffuser-api", "status": "ready",
            "devices": ["fake"], "resident_bytes": {"fake": WEIGHTS}, "pinned": True, "loads": 1,
            "evictions": {"host": 0, "released": 0}, "queue_depth": 0,
        }
        assert loaded["load_seconds"] >= 0 and "last_used_at" not in loaded  # no request yet
        assert loaded["family"] == "fake" and loaded["endpoints"]["edits"]["supported"] is True
        # GET / describes each model with the same function.
        described = {model["id"]: model for model in client.get("/").json()["models"]}
        assert {key: loaded[key] for key in described["model-a"]} == described["model-a"]

        cold = client.get("/v1/models/model-b").json()
        assert cold["status"] == "unloaded" and cold["resident_bytes"] == {} and cold["loads"] == 0
        assert "load_seconds" not in cold and "last_used_at" not in cold and "reason" not in cold
        # Capabilities come from the checkpoint: described without loading it.
        assert cold["family"] == "fake" and cold["sizes"] == {"rule": loaded["sizes"]["rule"], "default": "32x32"}
        assert models[1].loaded == []

        before = time.time()
        assert client.post(GEN, json={"prompt": "x", "model": "model-b"}).status_code == 200
        warm = client.get("/v1/models/model-b").json()
        assert warm["status"] == "ready" and warm["resident_bytes"] == {"fake": 2 * WEIGHTS} and warm["loads"] == 1
        assert int(before) <= warm["last_used_at"] <= time.time()


def test_unknown_model_ids_are_404_and_the_server_keeps_serving(tmp_path):
    with TestClient(fake_models_app(tmp_path, three_models())) as client:
        wait_ready(client)
        for path in ("/v1/models/nope", "/v1/models/b-alias", "/health?model=nope", "/health?model="):
            error = assert_envelope(client.get(path), 404, code="model_not_found")
            assert error["message"].endswith("Served models: model-a, model-b, model-c")
            assert_still_serves(client)


def test_health_waits_for_pinned_models_and_answers_per_model(tmp_path):
    gate = threading.Event()
    models = three_models()
    models[0].load_gate = gate
    with TestClient(fake_models_app(tmp_path, models)) as client:
        error = assert_envelope(client.get("/health"), 503)
        assert error["message"] == "model 'model-a' is still loading"
        assert_envelope(client.get("/health?model=model-a"), 503)
        assert client.get("/v1/models/model-a").json()["reason"] == error["message"]
        gate.set()
        wait_ready(client)
        assert client.get("/health?model=model-a").json() == {"status": "ok"}
        # Not pinned and never asked for: not ready, and /health does not wait for it.
        cold = assert_envelope(client.get("/health?model=model-b"), 503)
        assert "not loaded" in cold["message"] and client.get("/health").status_code == 200
        assert client.post(GEN, json={"prompt": "x", "model": "model-b"}).status_code == 200
        assert client.get("/health?model=model-b").status_code == 200


def test_a_failed_load_is_failed_with_our_words_and_others_serve(tmp_path):
    models = three_models()
    models[1].load_error = OSError("no file named /srv/secret/unet.safetensors")
    with TestClient(fake_models_app(tmp_path, models)) as client:
        wait_ready(client)
        failed = assert_envelope(client.post(GEN, json={"prompt": "x", "model": "model-b"}), 503)
        assert "secret" not in failed["message"]
        details = client.get("/v1/models/model-b").json()
        assert details["status"] == "failed" and details["reason"] == failed["message"]
        assert statuses(client)["model-b"] == "failed"
        assert_envelope(client.get("/health?model=model-b"), 503)
        assert client.get("/health").status_code == 200  # model-b is neither pinned nor the default
        assert_still_serves(client)


def test_websocket_says_loading_while_a_cold_model_loads(tmp_path):
    gate = threading.Event()
    models = three_models()
    models[1].load_gate = gate
    with TestClient(fake_models_app(tmp_path, models)) as client:
        wait_ready(client)
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"prompt": "fox", "model": "model-b", "seed": 3, "num_inference_steps": 2})
            first = socket.receive_json()
            gate.set()
            messages = [first]
            while messages[-1]["type"] not in ("done", "error"):
                messages.append(socket.receive_json())
    assert first == {"type": "loading"}
    assert [message["type"] for message in messages].count("loading") == 1
    completed = next(message for message in messages if message["type"] == "completed")
    assert pixel(completed["b64_json"]) == colour_of("fox", 3)
    assert models[1].runner.started("fox") and not models[0].runner.started("fox")


def test_sse_keeps_pinging_while_a_cold_model_loads(tmp_path):
    gate = threading.Event()
    models = three_models()
    models[2].load_gate = gate
    with TestClient(fake_models_app(tmp_path, models, stream_ping_s=0.05)) as client:
        wait_ready(client)
        deadline = threading.Timer(5.0, gate.set)  # a stream that never pings fails below, and does not hang
        deadline.start()
        with client.stream("POST", GEN, json={"prompt": "x", "model": "model-c", "stream": True}) as response:
            assert response.status_code == 200
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith(": ping"):
                    gate.set()  # the load ends once a ping has come, however busy the machine is
        deadline.cancel()
    first_event = next(index for index, line in enumerate(lines) if line.startswith("event:"))
    assert any(line.startswith(": ping") for line in lines[:first_event])  # while loading
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data:")]
    assert [event["type"] for event in events] == ["image_generation.completed"]  # nothing for Loading
    assert len(models[2].loaded) == 1


@pytest.mark.slow
def test_the_openai_sdk_lists_and_retrieves_models_over_a_real_port(tmp_path):
    with ThreadedServer(fake_models_app(tmp_path, three_models())) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        listed = client.models.list()
        assert [(model.id, model.status) for model in listed.data] == [
            ("model-a", "ready"), ("model-b", "unloaded"), ("model-c", "unloaded")
        ]
        model = client.models.retrieve("model-a")
        assert model.id == "model-a" and model.owned_by == "diffuser-api"
        assert model.status == "ready" and model.resident_bytes == {"fake": WEIGHTS}
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("nope")
        assert caught.value.code == "model_not_found"
        assert client.images.generate(model="model-b", prompt="x", size="32x32").data[0].b64_json
        assert client.models.retrieve("model-b").status == "ready"

