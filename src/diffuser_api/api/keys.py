"""The configured API keys, kept only as SHA-256 hashes, with their names, limits, role and models.

Keys come from ``DIFFUSER_API_KEYS`` (plain keys, hashed on load) or a keys file that holds
hashes only, so the file can be checked in or shared without handing out a secret. Only a
keys-file entry can be an admin or be limited to some models: a plain key is a user of every model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from diffuser_api.config import Settings
from diffuser_api.config.settings import RateLimitText

# Model ids or aliases -> the served ids they name; ValueError for a name nothing serves.
ModelIds = Callable[[Iterable[str]], frozenset[str]]


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: RateLimitText | None = None
    images: RateLimitText | None = None


class KeyEntry(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    limits: KeyLimits = Field(default_factory=KeyLimits)
    role: Literal["admin", "user"] = "user"
    models: list[str] | None = Field(None, min_length=1, description="Ids or aliases; absent: every model.")


@dataclass(frozen=True)
class ApiKey:
    """Who is calling: what logs, metrics and ``/`` show, the limits that apply, whether it may
    load and unload models, and which models it may use (None: every one)."""

    name: str
    sha256: bytes
    requests_limit: str | None = None
    images_limit: str | None = None
    admin: bool = False
    models: frozenset[str] | None = None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"API key names must be unique; repeated: {', '.join(duplicates)}")
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def named(self, name: str) -> ApiKey | None:
        """The key of that name (whose batch lines are charged to its limits as they run)."""
        return next((key for key in self._keys if key.name == name), None)

    def find(self, presented: str) -> ApiKey | None:
        """Compare against every key with ``compare_digest`` and no early exit, so the time
        taken says nothing about which key, or how much of one, matched."""
        digest = hash_key(presented)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found


def load_key_store(settings: Settings, model_ids: ModelIds) -> KeyStore:
    """``model_ids`` resolves the models an entry lists (the registry's ``ids_for``); a name
    nothing serves stops the start, so a typo never leaves a key quietly without a model."""
    keys = [_from_plain(secret.get_secret_value()) for secret in settings.api_keys]
    if settings.api_keys_file is not None:
        entries = read_keys_file(settings.api_keys_file)
        _refuse_unknown_models(entries, model_ids)
        keys += [_from_entry(entry, model_ids) for entry in entries]
    return KeyStore(keys)


def _refuse_unknown_models(entries: list[KeyEntry], model_ids: ModelIds) -> None:
    unknown = []
    for entry in entries:
        for name in entry.models or ():
            try:
                model_ids([name])
            except ValueError:
                unknown.append(f"'{name}' (key '{entry.name}')")
    if unknown:
        raise ValueError(f"the keys file names models this server does not serve: {', '.join(unknown)}")


def read_keys_file(path: Path) -> list[KeyEntry]:
    """YAML or JSON (JSON is YAML, but its own parser gives clearer errors): a list of
    entries, or ``{"keys": [...]}``."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if isinstance(data, dict):
        data = data.get("keys")
    return TypeAdapter(list[KeyEntry]).validate_python(data)


def _from_plain(key: str) -> ApiKey:
    digest = hash_key(key)
    return ApiKey(name=f"key-{digest.hex()[:8]}", sha256=digest)


def _from_entry(entry: KeyEntry, model_ids: ModelIds) -> ApiKey:
    return ApiKey(
        name=entry.name,
        sha256=bytes.fromhex(entry.key_sha256),
        requests_limit=entry.limits.requests,
        images_limit=entry.limits.images,
        admin=entry.role == "admin",
        models=None if entry.models is None else model_ids(entry.models),
    )
