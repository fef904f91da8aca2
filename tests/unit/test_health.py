"""/health and / tell callers whether models serve, in our words: a failed load's exception
(paths, library internals) goes to the log only."""

from __future__ import annotations

import logging
import time
from threading import Event

from fastapi.testclient import TestClient

from tests.fakes import FakeModel, fake_app, fake_models_app
from tests.unit.test_api import GEN, assert_envelope
from tests.unit.test_auth import bearer

SECRET_PATH = "/srv/models/secret-checkpoint/unet/diffusion_pytorch_model.safetensors"
KEY = "sk-health-test"


LOAD_ERROR = OSError(f"Error no file named diffusion_pytorch_model.safetensors found in {SECRET_PATH}")


def test_a_failed_load_is_reported_without_its_exception(tmp_path, caplog):
    broken = FakeModel("broken-model", pinned=True, load_error=LOAD_ERROR)
    with caplog.at_level(logging.ERROR, logger="diffuser_api.models.registry"), TestClient(
        fake_models_app(tmp_path, [broken], api_keys=[KEY])
    ) as client:
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).json()["error"]["message"].endswith("still loading"):
            assert time.monotonic() < deadline, "the load never failed"
            time.sleep(0.01)
        error = assert_envelope(health, 503)
        assert error["message"] == "model 'broken-model' failed to load; the server's log says why"
        assert "retry-after" not in health.headers  # retrying will not help
        generation = client.post(GEN, json={"prompt": "x"}, headers=bearer(KEY))
        assert assert_envelope(generation, 503)["message"] == error["message"]
        info = client.get("/", headers=bearer(KEY))
        assert info.status_code == 200
        (model,) = info.json()["models"]
        assert (model["id"], model["status"], model["reason"]) == ("broken-model", "failed", error["message"])
        assert model["family"] == "fake"  # capabilities come from the checkpoint, not the load
        for response in (health, generation, info):
            assert "secret" not in response.text and "OSError" not in response.text
    assert SECRET_PATH in caplog.text  # the operator still learns why


def test_health_while_loading_and_when_ready(tmp_path):
    gate = Event()
    with TestClient(fake_app(tmp_path, load_gate=gate)) as client:
        error = assert_envelope(client.get("/health"), 503)
        assert error["message"] == "model 'fake-model' is still loading"
        assert client.get("/health").headers["retry-after"] == "5"
        (model,) = client.get("/").json()["models"]
        assert (model["id"], model["status"], model["reason"]) == (
            "fake-model", "loading", "model 'fake-model' is still loading"
        )
        assert model["endpoints"]["generations"] == {"supported": True}  # known before the load
        gate.set()
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert health.json() == {"status": "ok"}
