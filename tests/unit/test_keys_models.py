"""Keys-file entries say a key's role and the models it may use; names are resolved at start."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from diffuser_api.api.keys import load_key_store
from diffuser_api.config import Settings
from tests.fakes import fake_models_app, png_bytes
from tests.unit.test_api import EDIT, GEN, VAR, assert_envelope, wait_ready
from tests.unit.test_auth import bearer, sha
from tests.unit.test_models_api import three_models

SERVED = {"model-a": "model-a", "model-b": "model-b", "alias-of-b": "model-b"}


def served_ids(names: Iterable[str]) -> frozenset[str]:
    """Stands in for ``ModelRegistry.ids_for``: ids and aliases to ids, ValueError otherwise."""
    ids = set()
    for name in names:
        if name not in SERVED:
            raise ValueError(f"unknown model '{name}'")
        ids.add(SERVED[name])
    return frozenset(ids)


def settings_with(tmp_path, entries: list[dict], **extra) -> Settings:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": entries}))
    return Settings(_env_file=None, api_keys_file=keys_file, **extra)


def test_role_and_models_are_read_and_resolved(tmp_path):
    settings = settings_with(tmp_path, [
        {"name": "ops", "key_sha256": sha("sk-ops"), "role": "admin"},
        {"name": "app", "key_sha256": sha("sk-app"), "models": ["model-a", "alias-of-b"]},
        {"name": "b-only", "key_sha256": sha("sk-b"), "role": "user", "models": ["alias-of-b"]},
    ], api_keys=["sk-plain"])
    store = load_key_store(settings, served_ids)
    ops, app, b_only, plain = (store.find(key) for key in ("sk-ops", "sk-app", "sk-b", "sk-plain"))
    assert (ops.admin, ops.models) == (True, None)
    assert (app.admin, app.models) == (False, frozenset({"model-a", "model-b"}))
    assert b_only.models == frozenset({"model-b"})  # an alias counts as the id it names
    assert (plain.admin, plain.models) == (False, None)  # plain keys: users of every model


def test_unknown_model_names_stop_the_start_naming_each(tmp_path):
    settings = settings_with(tmp_path, [
        {"name": "app", "key_sha256": sha("sk-app"), "models": ["model-a", "modle-b"]},
        {"name": "other", "key_sha256": sha("sk-other"), "models": ["nope"]},
    ])
    with pytest.raises(ValueError) as caught:
        load_key_store(settings, served_ids)
    message = str(caught.value)
    assert "'modle-b' (key 'app')" in message and "'nope' (key 'other')" in message
    assert "model-a" not in message


@pytest.mark.parametrize("entry", [
    {"role": "root"},  # only admin or user
    {"models": []},  # an empty list would lock the key out of everything: say so instead
    {"models": "model-a"},  # a list, not a string
])
def test_bad_role_or_models_are_refused(tmp_path, entry):
    settings = settings_with(tmp_path, [{"name": "app", "key_sha256": sha("sk-app"), **entry}])
    with pytest.raises(ValidationError):
        load_key_store(settings, served_ids)


LIMITED = "sk-limited-to-a"
FULL = "sk-every-model"


def limited_app(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [
        {"name": "limited", "key_sha256": sha(LIMITED), "models": ["model-a", "model-c"]},
        {"name": "full", "key_sha256": sha(FULL)},
    ]}))
    return fake_models_app(tmp_path, three_models(), api_keys_file=keys_file)


@pytest.fixture()
def client(tmp_path):

    with TestClient(limited_app(tmp_path)) as test_client:
        wait_ready(test_client)
        yield test_client


def test_a_limited_key_gets_404_for_other_models_on_every_route(client):

    limited = bearer(LIMITED)
    for name in ("model-b", "b-alias"):
        refusals = [
            client.post(GEN, json={"prompt": "x", "model": name}, headers=limited),
            client.post(GEN, json={"prompt": "x", "model": name, "stream": True}, headers=limited),
            client.post(EDIT, files={"image": ("a.png", png_bytes())}, data={"prompt": "x", "model": name},
                        headers=limited),
            client.post(VAR, files={"image": ("a.png", png_bytes())}, data={"model": name}, headers=limited),
        ]
        for response in refusals:
            error = assert_envelope(response, 404, param="model", code="model_not_found")
            # It lists only what this key may use: model-b stays unknown to it.
            served = error["message"].partition("Served models:")[2]
            assert served.strip().split(", ") == ["model-a", "model-c"], error["message"]
        with client.websocket_connect(f"/v1/images/ws?api_key={LIMITED}") as socket:
            socket.send_json({"prompt": "x", "model": name})
            message = socket.receive_json()
        assert message["type"] == "error" and message["error"]["code"] == "model_not_found"
    for path in ("/v1/models/model-b", "/health?model=model-b"):
        assert_envelope(client.get(path, headers=limited), 404, code="model_not_found")
    assert [card["id"] for card in client.get("/v1/models", headers=limited).json()["data"]] == ["model-a", "model-c"]
    assert [model["id"] for model in client.get("/", headers=limited).json()["models"]] == ["model-a", "model-c"]
    # Its own models serve, and the key without a list sees everything.
    own = client.post(GEN, json={"prompt": "x", "model": "model-c", "size": "32x32"}, headers=limited)
    assert own.status_code == 200
    assert client.post(GEN, json={"prompt": "x", "model": "model-b", "size": "32x32"},
                       headers=bearer(FULL)).status_code == 200
    assert client.get("/health?model=model-b", headers=bearer(FULL)).status_code == 200
    assert len(client.get("/v1/models", headers=bearer(FULL)).json()["data"]) == 3


def test_health_per_model_needs_a_key_when_keys_are_on(client):
    assert client.get("/health").json() == {"status": "ok"}  # still public
    for path in ("/health?model=model-b", "/health?model=model-a", "/health?model="):
        assert_envelope(client.get(path), 401, code="invalid_api_key")
    assert client.get("/health?model=model-a", headers=bearer(LIMITED)).status_code == 200


def test_a_keys_file_naming_an_unserved_model_stops_the_app_build(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"name": "app", "key_sha256": sha("sk-x"), "models": ["model-z"]}]}))
    with pytest.raises(ValueError, match="'model-z' \\(key 'app'\\)"):
        fake_models_app(tmp_path, three_models(), api_keys_file=keys_file)
