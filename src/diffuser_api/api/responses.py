"""What the routes answer, as pydantic models, for the OpenAPI document.

Documentation, not serialization: routes build their JSON themselves and leave a key out
rather than send it as null (as OpenAI does), so the models spell optional keys as
``T | SkipJsonSchema[None] = omitted()``: "may be absent, never null". Tests validate real answers
against the published schemas (response conformance), so a drift between the two fails there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema

COMPONENTS = "#/components/schemas/"


def omitted(description: str | None = None, *, alias: str | None = None) -> Any:
    """A key left out when it has no value: documented as optional, not as null."""
    return Field(None, alias=alias, description=description, json_schema_extra=_without_default)


def _without_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong and what is allowed.")
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error, requests, server_error.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable machine-readable code, e.g. invalid_value, model_not_found.")
    request_id: str = Field(description="Also in the x-request-id header; quote it when reporting a problem.")


class ErrorResponse(BaseModel):
    """Every error, ours or the framework's, in OpenAI's envelope."""

    error: ErrorDetail


class ImageData(BaseModel):
    """One output image: ``b64_json`` or ``url`` as ``response_format`` asked."""

    b64_json: str | SkipJsonSchema[None] = omitted()
    url: str | SkipJsonSchema[None] = omitted()
    revised_prompt: str | SkipJsonSchema[None] = omitted()
    seed: int = Field(description="Seed of this image; send it back to reproduce the image.")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    """Text tokens as the prompt encoder saw them; diffusers has no image tokens."""

    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_tokens_details: InputTokensDetails


class ImagesResponse(BaseModel):
    """OpenAI's ``ImagesResponse``; ``size``/``quality`` only when they are one of OpenAI's values."""

    created: int
    data: list[ImageData]
    background: Literal["transparent", "opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    size: str | SkipJsonSchema[None] = omitted()
    quality: Literal["low", "medium", "high"] | SkipJsonSchema[None] = omitted()
    usage: Usage | SkipJsonSchema[None] = omitted()


class ImageEventFields(BaseModel):
    """What every image event of a stream carries, partial or final."""

    b64_json: str
    created_at: int
    size: str
    quality: str
    background: Literal["transparent", "opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    image_index: int | SkipJsonSchema[None] = omitted("Which image, when n > 1.")


class PartialImageEvent(ImageEventFields):
    """A preview while the image is made (``partial_images`` asks for them)."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class CompletedImageEvent(ImageEventFields):
    """One finished image; a stream sends one per image."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: Usage
    seed: int


ModelStatusName = Literal["ready", "loading", "offloaded", "unloaded", "failed"]
STATUS_MEANING = (
    "ready: on its devices, serving; loading: being loaded; offloaded: weights in host memory, "
    "a request moves them back; unloaded: not in memory, a request loads it; failed: the last load failed, "
    "a later request tries again."
)


class ModelCard(BaseModel):
    """OpenAI's model object plus ``status``, which OpenAI's SDKs keep as an extra field."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    status: ModelStatusName = Field(description=STATUS_MEANING)
    parent: str | SkipJsonSchema[None] = omitted("A preset's model (the preset's status is that model's).")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class SizeDescription(BaseModel):
    rule: str
    default: str


class ModelDefaults(BaseModel):
    steps: int
    guidance_scale: float | None
    strength: float | None


class GenerationsSupport(BaseModel):
    supported: bool


class EditsSupport(BaseModel):
    supported: bool
    mask: bool
    multiple_images: bool
    max_images: int


class VariationsSupport(BaseModel):
    supported: bool
    method: str | None


class EndpointSupport(BaseModel):
    generations: GenerationsSupport
    edits: EditsSupport
    variations: VariationsSupport


class PreviewDescription(BaseModel):
    mode: Literal["latent", "vae"] = Field(
        description="'latent': a fixed linear map of the latent channels to RGB (nearly free); 'vae': a VAE "
        "decode of downscaled latents (DIFFUSER_PREVIEW_MODE=vae, or no latent map fits this checkpoint)."
    )
    method: str = Field(description="How previews are made, and why not by the latent map when they are not.")


class ModelDescription(BaseModel):
    """What the model can do, known from its checkpoint before any load (absent only when the
    checkpoint could not be read); ``reason`` only while loading or failed (our words, never
    the load's exception)."""

    id: str
    status: ModelStatusName = Field(description=STATUS_MEANING)
    reason: str | SkipJsonSchema[None] = omitted()
    family: str | SkipJsonSchema[None] = omitted()
    pipeline: str | SkipJsonSchema[None] = omitted()
    notes: list[str] | SkipJsonSchema[None] = omitted()
    endpoints: EndpointSupport | SkipJsonSchema[None] = omitted()
    extras: list[str] | SkipJsonSchema[None] = omitted()
    sizes: SizeDescription | SkipJsonSchema[None] = omitted()
    defaults: ModelDefaults | SkipJsonSchema[None] = omitted()
    previews: PreviewDescription | SkipJsonSchema[None] = omitted()
    lora: bool | SkipJsonSchema[None] = omitted("Whether its pipeline can load LoRA adapters.")


class AdapterDescription(BaseModel):
    name: str
    scale: float = Field(description="The scale a request that names no scale gets.")
    loaded: bool = Field(description="In memory now (else the first request naming it loads it).")


class LoraChoiceDescription(BaseModel):
    name: str
    scale: float | None = Field(description="null: the adapter's configured scale.")


class PresetDefaults(BaseModel):
    steps: int | SkipJsonSchema[None] = omitted()
    guidance_scale: float | SkipJsonSchema[None] = omitted()
    size: str | SkipJsonSchema[None] = omitted()


class PresetDetails(ModelCard):
    """``GET /v1/models/{id}`` of a preset: its model, LoRAs and defaults (a request overrides them)."""

    loras: list[LoraChoiceDescription]
    defaults: PresetDefaults


class Evictions(BaseModel):
    host: int = Field(description="Times its weights moved to host memory to make room.")
    released: int = Field(description="Times its weights were dropped from memory to make room.")


class StepCacheDescription(BaseModel):
    default: str = Field(description="The method a request without step_cache gets (off, or the models file's).")
    threshold: float | SkipJsonSchema[None] = omitted("The default method's threshold, when the models file sets it.")
    cache_interval: int | SkipJsonSchema[None] = omitted("TaylorSeer's interval, when the models file sets it.")
    methods: list[str] = Field(description="Values the step_cache request field may take on this model.")


class SpeedDescription(BaseModel):
    step_cache: StepCacheDescription
    compile: bool = Field(description="Regional torch.compile of the denoiser, done during warm-up.")


class MemoryDescription(BaseModel):
    quantization: Literal["none", "int8", "fp8", "nf4"]
    cpu_offload: Literal["none", "model", "sequential"]
    vae_tiling: bool


class ModelDetails(ModelDescription):
    """``GET /v1/models/{id}``: the model object, what it can do, and where it is now."""

    object: Literal["model"]
    created: int
    owned_by: str
    devices: list[str] = Field(description="The devices it runs on (one worker each).")
    resident_bytes: dict[str, int] = Field(description="Bytes of weights on each device now; empty when not loaded.")
    pinned: bool = Field(description="Loaded at start and never evicted.")
    loads: int = Field(description="Times it was loaded or moved back from host memory.")
    evictions: Evictions
    queue_depth: int = Field(description="Requests waiting for it now.")
    speed: SpeedDescription | SkipJsonSchema[None] = omitted("Speed options; absent when the checkpoint is unreadable.")
    memory: MemoryDescription
    load_seconds: float | SkipJsonSchema[None] = omitted("Time of its last load; absent before the first.")
    last_used_at: int | SkipJsonSchema[None] = omitted("Unix time of its last request; absent before the first.")
    adapters: list[AdapterDescription] = Field(description="Its registered LoRA adapters (requests name them).")
    max_loaded_adapters: int = Field(description="Adapters held in memory at once; the least recently used leaves.")


class CallerDescription(BaseModel):
    api_key: str | None = Field(description="Name of the caller's API key; null when keys are off.")
    rate_limits: dict[str, str | None] = Field(description="Limit per kind (requests, images); null: unlimited.")


class ServiceInfo(BaseModel):
    service: str
    version: str
    api_prefix: str
    docs: str
    models: list[ModelDescription]
    caller: CallerDescription


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"{COMPONENTS}{model.__name__}"}


# One SSE event, as a fuzzer reads a stream without OpenAPI 3.2's itemSchema: each event's
# ``data`` is one line of JSON, an image event or, after the stream started, an error.
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "description": "The JSON's type, or 'error'."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [ref(PartialImageEvent), ref(CompletedImageEvent), ref(ErrorResponse)]},
        },
    },
}


def images_answer(*, streams: bool) -> dict[int | str, dict[str, Any]]:
    """The 200 of an image route: the images as JSON, or with ``stream=true`` an SSE stream."""
    answer: dict[str, Any] = {"model": ImagesResponse, "description": "The images"}
    if streams:
        answer["description"] = "The images, or with stream=true a text/event-stream of image events"
        answer["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    return {200: answer}


IMAGE_FILE_ANSWER: dict[int | str, dict[str, Any]] = {200: {
    "description": "The image, in the format it was made in",
    "content": {media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in ("image/png", "image/jpeg", "image/webp")},
}}
METRICS_ANSWER: dict[int | str, dict[str, Any]] = {200: {
    "description": "Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}}


ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field, the body, or a Host header the server does not serve",
    401: "Missing or wrong API key",
    403: "The API key may not do this: loading and unloading models needs role admin",
    404: "Unknown model, image file or path",
    408: "The request body did not arrive in time",
    409: "The job has already finished, so it cannot be cancelled",
    410: "The job has expired: finished jobs and their images are kept job_ttl_s",
    413: "The body or an image part is larger than the server takes",
    429: "Rate limit reached, or the model's queue is full (see Retry-After)",
    500: "The model failed on this request, or a bug of ours (the message carries the request id)",
    501: "The model cannot do this task or option",
    503: "The model is loading or failed to load, or the server has too many connections",
    504: "The request ran past the server's time limit",
}
# Answered by middleware before any route runs: Host allow-list (400), body size and time
# limits (413, 408), connection limit (503), and an unexpected error (500).
EVERY_ROUTE = (400, 408, 413, 500, 503)
# Answered on every path that needs an API key: a missing key (401) or a spent rate limit (429).
KEYED_ROUTE = (401, 429)
# What the image endpoints add: unknown model, queue full, unsupported task, timeout.
IMAGE_ROUTE = (404, 429, 501, 503, 504)


def error_responses(*statuses: int, keyed: bool = True) -> dict[int | str, dict[str, Any]]:
    """``responses=`` documenting the envelope for every status a route can answer with.

    ``keyed=False`` for paths that take no API key (``/health``, image files).
    """
    documented = set(EVERY_ROUTE) | set(statuses) | (set(KEYED_ROUTE) if keyed else set())
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in sorted(documented)
    }
