"""``POST /v1/models/{id}/load`` and ``/unload``: 202 while it happens, 200 when there is nothing
to do; only admin keys with keys on, and only with ``admin_open`` on a server without keys."""

from __future__ import annotations

import threading

import pytest
import yaml
from fastapi.testclient import TestClient

from tests.fakes import FakeModel, FakeRunner, fake_models_app
from tests.unit.test_api import assert_envelope, wait_ready
from tests.unit.test_auth import bearer, sha
from tests.unit.test_models_api import assert_still_serves, three_models, wait_status

ADMIN = "sk-admin-key"
USER = "sk-user-key"
LOAD = "/v1/models/{}/load"
UNLOAD = "/v1/models/{}/unload"


def keyed_app(tmp_path, models: list[FakeModel], **settings):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [
        {"name": "ops", "key_sha256": sha(ADMIN), "role": "admin"},
        {"name": "app", "key_sha256": sha(USER)},
    ]}))
    return fake_models_app(tmp_path, models, api_keys_file=keys_file, **settings)


def test_an_admin_loads_and_unloads(tmp_path):
    gate = threading.Event()
    models = three_models()
    models[1].load_gate = gate
    with TestClient(keyed_app(tmp_path, models)) as client:
        wait_ready(client)
        started = client.post(LOAD.format("model-b"), headers=bearer(ADMIN))
        assert started.status_code == 202
        assert started.json() | {"created": 0} == {
            "id": "model-b", "object": "model", "created": 0, "owned_by": "diffuser-api", "status": "loading"
        }
        again = client.post(LOAD.format("model-b"), headers=bearer(ADMIN))  # a load under way: join it
        assert again.status_code == 202 and again.json()["status"] == "loading"
        gate.set()
        wait_status(client, "model-b", "ready", bearer(ADMIN))
        assert len(models[1].loaded) == 1  # one load for both calls
        done = client.post(LOAD.format("model-b"), headers=bearer(ADMIN))
        assert done.status_code == 200 and done.json()["status"] == "ready"

        unloading = client.post(UNLOAD.format("model-b"), headers=bearer(ADMIN))
        assert unloading.status_code == 202 and unloading.json()["id"] == "model-b"
        details = wait_status(client, "model-b", "unloaded", bearer(ADMIN))
        assert details["resident_bytes"] == {} and models[1].releases == 1
        nothing = client.post(UNLOAD.format("model-b"), headers=bearer(ADMIN))
        assert nothing.status_code == 200 and nothing.json()["status"] == "unloaded"
        # A request loads it again.
        assert client.post("/v1/images/generations", json={"prompt": "x", "model": "model-b"},
                           headers=bearer(USER)).status_code == 200
        assert len(models[1].loaded) == 2


def test_refused_without_the_admin_role_or_a_key(tmp_path):
    models = three_models()
    with TestClient(keyed_app(tmp_path, models)) as client:
        wait_ready(client)
        for route in (LOAD, UNLOAD):
            for model in ("model-b", "model-a", "nope"):  # unknown ids too: no hint what exists
                error = assert_envelope(client.post(route.format(model), headers=bearer(USER)), 403,
                                        code="admin_required")
                assert "admin" in error["message"] and error["type"] == "invalid_request_error"
                assert_envelope(client.post(route.format(model)), 401, code="invalid_api_key")
            assert_envelope(client.post(route.format("nope"), headers=bearer(ADMIN)), 404, code="model_not_found")
        assert models[1].loaded == [] and models[0].releases == 0
        assert client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32"},
                           headers=bearer(USER)).status_code == 200


def test_an_open_server_refuses_admin_routes_unless_admin_open(tmp_path):
    models = three_models()
    with TestClient(fake_models_app(tmp_path / "closed", models)) as client:
        wait_ready(client)
        for route in (LOAD, UNLOAD):
            error = assert_envelope(client.post(route.format("model-b")), 403, code="admin_required")
            assert "DIFFUSER_ADMIN_OPEN" in error["message"]
        assert models[1].loaded == []
        assert_still_serves(client)
    models = three_models()
    with TestClient(fake_models_app(tmp_path / "open", models, admin_open=True)) as client:
        wait_ready(client)
        assert client.post(LOAD.format("model-b")).status_code == 202
        wait_status(client, "model-b", "ready")
        assert client.post(UNLOAD.format("model-b")).status_code == 202
        wait_status(client, "model-b", "unloaded")


@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_other_methods_on_admin_routes(tmp_path, method):
    with TestClient(fake_models_app(tmp_path, [FakeModel("model-a", FakeRunner(), pinned=True)],
                                    admin_open=True)) as client:
        wait_ready(client)
        response = getattr(client, method)(LOAD.format("model-a"))
        # GET reads "model-a/load" as a model id; the others are the wrong method.
        assert_envelope(response, 404 if method == "get" else 405)
        assert_still_serves(client)
