"""Keys-file entries say a key's role and the models it may use; names are resolved at start."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pytest
import yaml
from pydantic import ValidationError

from diffuser_api.api.keys import load_key_store
from diffuser_api.config import Settings
from diffuser_api.errors import ModelNotFound

SERVED = {"model-a": "model-a", "model-b": "model-b", "alias-of-b": "model-b"}


def served_ids(names: Iterable[str]) -> frozenset[str]:
    """Stands in for ``ModelRegistry.ids_for``: ids and aliases to ids, ModelNotFound otherwise."""
    ids = set()
    for name in names:
        if name not in SERVED:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
        ids.add(SERVED[name])
    return frozenset(ids)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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
