"""OpenAI request bodies as pydantic models, plus the diffusers extras we document.

``extra="allow"`` keeps unknown names so ``reject_unknown_fields`` can answer them the way
OpenAI does (400 naming the field) instead of pydantic silently dropping them.

JSON bodies are strict, as OpenAI's are: ``"n": "2"`` or ``"stream": "yes"`` is a 400, not two
images or a stream. Multipart forms carry every value as text, so their models convert it.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from diffuser_api.domain.requests import MAX_SEED
from diffuser_api.errors import InvalidRequest

logger = logging.getLogger(__name__)



class LoraBody(BaseModel):
    """One entry of ``loras``: a registered adapter's name (never a path) and an optional scale."""

    # JSON in both kinds of body (a form's as its text); NaN and infinities are no scales.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200)
    scale: float | None = None  # the service bounds it (DIFFUSER_MAX_LORA_SCALE)


def _json_text(value: Any) -> Any:
    """Multipart forms carry every field as text: ``loras`` arrives as its JSON."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError('loras must be a JSON list such as [{"name": "pixel-art", "scale": 0.6}]') from None
    return value


class ImageOptions(BaseModel):
    """Fields every image endpoint takes. NaN and infinities are no numbers here (Python's JSON
    reader takes ``NaN``; a text field ``"inf"`` reads as one): no bound would catch them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    # Upper bounds of n and num_inference_steps are settings (max_n, max_steps), checked by the service.
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    # diffusers extras (sent by OpenAI clients through extra_body)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    true_cfg_scale: float | None = Field(None, ge=0.0, le=100.0)
    negative_prompt: str | None = Field(None, max_length=32000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    strength: float | None = Field(None, gt=0.0, le=1.0)
    loras: Annotated[list[LoraBody] | None, BeforeValidator(_json_text)] = Field(None, max_length=64)
    step_cache: Literal["off", "first_block_cache", "taylorseer", "magcache"] | None = None


class PromptedOptions(ImageOptions):
    """Fields of the endpoints that take a prompt and can stream."""

    prompt: str = Field(max_length=32000)
    quality: str | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)


class GenerationBody(PromptedOptions):
    model_config = ConfigDict(strict=True)

    style: Literal["vivid", "natural"] | None = None  # dall-e-3 only; accepted, no effect here
    moderation: Literal["low", "auto"] | None = None  # accepted; no moderation model is run


class EditForm(PromptedOptions):
    """The multipart edit's text fields; files are read separately."""

    input_fidelity: Literal["high", "low"] | None = None


class ImageReference(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    image_url: str | None = None  # bounded by the edit body's cap (max_edit_bytes), not here
    file_id: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageReference:
        if (self.image_url is None) == (self.file_id is None):
            raise ValueError("give exactly one of image_url or file_id")
        return self


class EditJSONBody(EditForm):
    model_config = ConfigDict(strict=True)

    images: list[ImageReference] = Field(min_length=1, max_length=16)
    mask: ImageReference | None = None
    moderation: Literal["low", "auto"] | None = None


class VariationForm(ImageOptions):
    """Variations take no prompt: OpenAI clients never send one."""


def reject_unknown_fields(body: BaseModel, allow: bool) -> None:
    """OpenAI answers unknown arguments with a 400; so do we, unless a setting relaxes it."""
    unknown = sorted(body.model_extra or {})
    if not unknown:
        return
    if allow:
        logger.info("ignoring unknown request fields: %s", ", ".join(unknown))
        return
    raise InvalidRequest(
        f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0], code="unknown_parameter"
    )
