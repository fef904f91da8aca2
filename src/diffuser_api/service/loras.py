"""A request's ``loras`` (or its preset's) checked against the model's registered adapters.

Requests name adapters the models file registered, never files or URLs: a server that loaded
whatever path a request sent would read any file it can reach and fetch from anywhere. The
result is the job's adapter set in one canonical form (sorted, scale-0 entries dropped, since
scale 0 is the base model), so requests asking for the same thing batch together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from diffuser_api.config import Settings
from diffuser_api.domain import AdapterSet, Capabilities, ImageRequest, LoraChoice
from diffuser_api.errors import InvalidRequest
from diffuser_api.models.spec import AdapterSpec, ModelDefaults, PresetSpec

# What a path or URL has and an adapter name never has (see the models file's ADAPTER_NAME).
_PATH_MARKS = ("/", "\\", ":", "~")


def resolve_loras(
    request: ImageRequest,
    preset: PresetSpec | None,
    caps: Capabilities,
    adapters: Sequence[AdapterSpec],
    owner: str,
    settings: Settings,
) -> AdapterSet:
    """The request's ``loras`` if it sent them (``[]`` too: no adapters), else its preset's."""
    chosen: tuple[LoraChoice, ...] = request.loras if request.loras is not None else (preset.loras if preset else ())
    if not chosen:
        return ()
    if not caps.lora:
        raise InvalidRequest(
            f"{owner} cannot load LoRA adapters (its pipeline has no LoRA support); leave loras out",
            param="loras", code="unsupported_parameter",
        )
    if len(chosen) > settings.max_loras_per_request:
        raise InvalidRequest(
            f"at most {settings.max_loras_per_request} LoRA adapters per request; got {len(chosen)}",
            param="loras", code="invalid_value",
        )
    registered = {adapter.name: adapter for adapter in adapters}
    pairs: dict[str, float] = {}
    for choice in chosen:
        if choice.name.startswith(".") or any(mark in choice.name for mark in _PATH_MARKS):
            raise InvalidRequest(
                f"loras name adapters registered for the model, never paths or URLs; {_listing(owner, registered)}",
                param="loras", code="invalid_value",
            )
        adapter = registered.get(choice.name)
        if adapter is None:
            raise InvalidRequest(
                f"unknown LoRA adapter '{choice.name}'; {_listing(owner, registered)}",
                param="loras", code="invalid_value",
            )
        if choice.name in pairs:
            raise InvalidRequest(f"LoRA adapter '{choice.name}' is named twice", param="loras", code="invalid_value")
        scale = adapter.scale if choice.scale is None else choice.scale
        if abs(scale) > settings.max_lora_scale:
            raise InvalidRequest(
                f"scale {scale:g} of LoRA adapter '{choice.name}' is outside "
                f"-{settings.max_lora_scale:g}..{settings.max_lora_scale:g}",
                param="loras", code="invalid_value",
            )
        pairs[choice.name] = scale
    return tuple(sorted((name, scale) for name, scale in pairs.items() if scale != 0))


def _listing(owner: str, registered: dict[str, AdapterSpec]) -> str:
    return f"{owner} has: {', '.join(sorted(registered)) or 'no adapters'}"


def with_preset_defaults(caps: Capabilities, defaults: ModelDefaults, owner: str) -> Capabilities:
    """The model's capabilities with a preset's defaults as its own: what a request leaves out
    gets the preset's steps, guidance and size; what it sends wins."""
    size = caps.size
    if defaults.size is not None:
        width, height = defaults.size
        size.check(width, height, requested=f"{width}x{height}", owner=owner)
        size = dataclasses.replace(size, default_width=width, default_height=height)
    return dataclasses.replace(
        caps,
        size=size,
        default_steps=defaults.steps or caps.default_steps,
        default_guidance_scale=(
            caps.default_guidance_scale if defaults.guidance_scale is None else defaults.guidance_scale
        ),
    )
