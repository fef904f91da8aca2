"""/health and / tell callers whether models serve, in our words: a failed load's exception
(paths, library internals) goes to the log only."""

from __future__ import annotations

import logging
import time
from threading import Event

from fastapi.testclient import TestClient

from diffuser_api.api.app import create_app
from diffuser_api.engine import EngineLimits
from diffuser_api.models.registry import LoadedRunners, ModelHandle, ModelRegistry
from tests.fakes import fake_app
from tests.unit.test_api import GEN, assert_envelope
from tests.unit.test_auth import bearer

SECRET_PATH = "/srv/models/secret-checkpoint/unet/diffusion_pytorch_model.safetensors"
KEY = "sk-health-test"


def broken_loader() -> LoadedRunners:
    raise OSError(f"Error no file named diffusion_pytorch_model.safetensors found in {SECRET_PATH}")


def test_a_failed_load_is_reported_without_its_exception(tmp_path, caplog):
    settings = fake_app(tmp_path, api_keys=[KEY]).state.settings
    handle = ModelHandle("broken-model", broken_loader, EngineLimits())
    with caplog.at_level(logging.ERROR, logger="diffuser_api.models.registry"), TestClient(
        create_app(settings, ModelRegistry([handle]))
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
        assert model == {"id": "broken-model", "status": "failed", "reason": error["message"]}
        for response in (health, generation, info):
            assert "secret" not in response.text and "OSError" not in response.text
    assert SECRET_PATH in caplog.text  # the operator still learns why


def test_health_while_loading_and_when_ready(tmp_path):
    gate = Event()
    with TestClient(fake_app(tmp_path, load_gate=gate)) as client:
        error = assert_envelope(client.get("/health"), 503)
        assert error["message"] == "model 'fake-model' is still loading"
        assert client.get("/health").headers["retry-after"] == "5"
        assert client.get("/").json()["models"] == [
            {"id": "fake-model", "status": "loading", "reason": "model 'fake-model' is still loading"}
        ]
        gate.set()
        deadline = time.monotonic() + 10
        while (health := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert health.json() == {"status": "ok"}
