"""Every setting of the server, read once from ``DIFFUSER_*`` variables or a ``.env`` file.

Built in ``main`` and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import limits
from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from diffuser_api.domain.requests import Task

DEFAULT_QUALITY_STEP_FACTORS = {
    "low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5,
}


def split_list(value: object) -> object:
    """Accept ``a,b,c`` as well as a JSON list, since env vars are plain strings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode]


def _per_minute(value: object) -> object:
    """A bare number is per minute, the unit the OpenAI docs speak in."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return f"{int(value)}/minute"
    return value


def _parseable(value: str) -> str:
    limits.parse(value)  # raises ValueError naming the bad text
    return value


# A rate limit in the ``limits`` notation: "60/minute", "1000 per hour", "5/2 seconds", or 60.
RateLimitText = Annotated[str, BeforeValidator(_per_minute), AfterValidator(_parseable)]

WEBHOOK_SECRET_PREFIX = "whsec_"
# Standard Webhooks asks for keys of 24 to 64 random bytes.
WEBHOOK_KEY_BYTES = (24, 64)


def webhook_signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret, ``whsec_`` then the key in base64.

    Raises ValueError saying what is wrong, never quoting the secret."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"the webhook secret must be {WEBHOOK_SECRET_PREFIX}<base64 key>, as Standard Webhooks has it")
    try:
        encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)  # padding optional
    except binascii.Error:
        raise ValueError(f"the webhook secret's key after {WEBHOOK_SECRET_PREFIX} is not valid base64") from None
    shortest, longest = WEBHOOK_KEY_BYTES
    if not shortest <= len(key) <= longest:
        raise ValueError(f"the webhook secret's key is {len(key)} bytes; it must be {shortest} to {longest}")
    return key


def _webhook_secret(value: SecretStr | None) -> SecretStr | None:
    if value is not None:
        webhook_signing_key(value.get_secret_value())
    return value


def _http_url(value: str | None) -> str | None:
    if value is not None:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the webhook URL must be an http:// or https:// URL with a host")
    return value


class Settings(BaseSettings):
    # A refused setting is named with the reason but never echoed: secrets (API keys, the
    # webhook secret, storage credentials) must not reach the start-up log.
    model_config = SettingsConfigDict(
        env_prefix="DIFFUSER_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    # Model
    model_id: str = Field("tiny-sd", description="Hub id, local folder, or a built-in tiny model (tiny-sd).")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "diffuser-api", description="Where built-in tiny models are built and cached."
    )
    device: StrList = Field(
        default_factory=lambda: ["auto"],
        description="auto (cuda if available, else cpu), or devices like cuda:0,cuda:1: one worker each.",
    )
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu."
    )
    disabled_tasks: Annotated[list[Task], NoDecode] = Field(
        default_factory=list,
        description="Tasks to switch off even if the model can do them (generation, edit, ...). Never switches one on.",
    )
    family: str | None = Field(
        None,
        description="Model family to serve the model as (sdxl, flux, qwen-image-edit, ...); "
        "default: detected from the pipeline class in model_index.json.",
    )
    warmup: bool = Field(True, description="Run one tiny generation after loading, before /health says ready.")
    models_file: Path | None = Field(
        None,
        description="YAML file of several models (ids, aliases, per-model settings, memory budgets); "
        "default: one model, model_id, with the settings here.",
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    api_prefix: str = "/v1"
    public_base_url: str | None = Field(None, description="Base for url responses; default: the request's own.")
    trusted_proxies: StrList = Field(
        default_factory=list,
        description="Proxy addresses or networks (10.0.0.0/8) whose X-Forwarded-For/-Proto/-Host count, for the "
        "whole app and uvicorn alike; the client is the right-most forwarded address not in this list.",
    )
    allowed_hosts: StrList | None = Field(
        None,
        description="Host header allow-list (DNS rebinding); default: localhost, 127.0.0.1 and [::1] on any port "
        "when bound to a loopback address, any host otherwise. * allows any.",
    )
    strict_model_names: bool = Field(
        False, description="If false, OpenAI model names (dall-e-*, gpt-image-*) route to the default model."
    )
    allow_unknown_fields: bool = Field(
        False, description="If true, unknown request fields are logged and ignored instead of a 400."
    )
    shutdown_grace_s: float = Field(30.0, description="On SIGTERM, how long to finish in-flight requests.")

    # Bodies and connections: enforced while reading, before anything is parsed
    max_json_bytes: int = Field(
        1024 * 1024, description="Largest body of generations and the other small routes (413 above)."
    )
    max_edit_bytes: int = Field(
        64 * 1024 * 1024, description="Largest whole body of edits and variations, JSON or multipart (413 above)."
    )
    max_upload_bytes: int = Field(25 * 1024 * 1024, description="Largest image or mask part (413 above).")
    max_discard_bytes: int = Field(
        64 * 1024 * 1024,
        description="After a 413, the rest of the body is read and dropped up to this many bytes, so clients that "
        "send before reading still see the answer; past it the connection is closed.",
    )
    max_connections: int = Field(256, description="Most open connections; beyond, 503 with Retry-After.")
    body_timeout_s: float = Field(
        30.0, description="A request body that makes no progress for this long is answered 408."
    )

    # Request bounds and defaults
    max_input_pixels: int = Field(
        4096 * 4096, description="Largest upload in pixels, read from its header before decoding (400 above)."
    )
    max_steps: int = Field(100, description="Most denoising steps per request (400 above).")
    max_pixel_steps: int = Field(
        2**30, description="Most n x width x height x steps per request (400 above): the cost cap of one request."
    )
    max_codec_queue: int = Field(
        32, description="Most decode and encode tasks waiting for the codec threads; beyond, 429 with Retry-After."
    )
    min_image_size: int = 64
    max_image_size: int = 2048
    max_n: int = Field(10, description="Most images per request (OpenAI allows 10).")
    default_steps: int | None = Field(None, description="Overrides the model family's default steps.")
    default_guidance_scale: float | None = Field(None, description="Overrides the family's default guidance.")
    quality_step_factors: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_QUALITY_STEP_FACTORS),
        description="quality -> multiple of the default steps, unless num_inference_steps is given.",
    )
    variation_prompt: str = Field("", description="Prompt used when variations run as image-to-image.")
    variation_strength: float = Field(0.7, description="Strength used when variations run as image-to-image.")
    max_loras_per_request: int = Field(4, ge=0, description="Most LoRA adapters one request may name (400 above).")
    max_lora_scale: float = Field(
        2.0, gt=0, description="Largest LoRA scale a request may send, either sign (400 beyond +-this)."
    )
    max_loaded_adapters: int = Field(
        8, gt=0, description="LoRA adapters held in memory per model (LRU), unless its models-file entry says."
    )

    # Engine
    max_queue_size: int = Field(
        64, description="Queued interactive requests per model; beyond, 429 with Retry-After (jobs not counted)."
    )
    max_batch_size: int = Field(8, description="Most images in one pipeline call.")
    max_batch_pixels: int = Field(8 * 1024 * 1024, description="Most output pixels in one pipeline call.")
    batch_wait_ms: float = Field(
        5.0, description="How long a worker waits for compatible requests to batch, while requests overlap."
    )
    request_timeout_s: float = Field(300.0, description="Past this a request is cancelled and answers 504.")
    priority_ageing_s: float = Field(
        30.0, gt=0.0,
        description="Queued work moves up one priority class (batch lines, then async jobs, then interactive) "
        "for every this many seconds it has waited, so lower classes never starve.",
    )

    # Streaming
    stream_ping_s: float = Field(5.0, description="Seconds between ': ping' keep-alive comments on SSE streams.")
    preview_mode: Literal["latent", "vae"] = Field(
        "latent",
        description="How streamed previews are made: 'latent' maps the latent channels to RGB with the "
        "family's fixed published factors (nearly free; a model whose latents match no map falls back to "
        "'vae', as GET /v1/models/{id} says); 'vae' decodes the latents with the model's VAE.",
    )
    preview_scale: float = Field(
        0.25, gt=0.0, le=1.0,
        description="VAE previews decode latents scaled by this factor, then resize up: 0.25 costs a "
        "sixteenth of a full VAE decode or less; 1.0 gives full-resolution previews.",
    )

    # Async jobs (Prefer: respond-async)
    jobs_url: str | None = Field(
        None,
        description="Database of async jobs: sqlite:///path or postgresql://user:pass@host/db (several replicas); "
        "default: SQLite at cache_dir/jobs.sqlite3.",
    )
    job_max_attempts: int = Field(3, ge=1, description="Runs a job may start (crashes, failures) before it is failed.")
    job_lease_s: float = Field(
        30.0, gt=0.0, description="A running job's claim lasts this long unless renewed; a dead replica's jobs "
        "run again once it lapses.",
    )
    job_ttl_s: float = Field(
        24 * 3600.0, gt=0.0, description="Finished jobs and their images are kept this long, then expire (410)."
    )
    job_timeout_s: float = Field(3600.0, gt=0.0, description="Longest running time of one attempt of a job.")
    max_pending_jobs: int = Field(10_000, ge=1, description="Most queued and running jobs; beyond, 429.")
    max_jobs_per_key: int | None = Field(
        None, ge=1, description="Most queued and running jobs per API key (per server without keys); None: no cap."
    )
    job_poll_s: float = Field(
        1.0, gt=0.0, description="How often the database is read for new jobs, cancels and other replicas' progress."
    )

    # Batch API and files (/v1/files, /v1/batches)
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Largest upload to POST /v1/files (its own cap, not the edits cap)."
    )
    max_batch_lines: int = Field(50_000, ge=1, description="Most lines (requests) in one batch input file.")
    files_max_bytes_per_key: int | None = Field(
        None, ge=1, description="Most bytes of uploaded files one API key may keep stored; None: no quota."
    )
    file_ttl_s: float | None = Field(
        30 * 24 * 3600.0, gt=0.0,
        description="Uploaded batch files expire this long after upload unless expires_after says otherwise; "
        "None: kept until deleted. Files of other purposes are kept unless expires_after is sent.",
    )
    batch_output_ttl_s: float = Field(
        30 * 24 * 3600.0, gt=0.0,
        description="Batch output and error files expire this long after they are written, unless the batch's "
        "output_expires_after says otherwise.",
    )
    batch_window_s: float = Field(
        24 * 3600.0, gt=0.0,
        description="The completion window ('24h'): a batch still running this long after creation expires; "
        "lines not yet run are not run, the finished ones are in its output.",
    )

    # Storage for response_format=url
    storage_dir: Path = Field(
        Path.home() / ".cache" / "diffuser-api" / "images", description="Where url responses are written."
    )

    # Access: API keys, rate limits, browsers
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted API keys; each is named key-<first 8 hex of its sha256>."
    )
    api_keys_file: Path | None = Field(
        None, description="YAML or JSON list of keys: name, key_sha256, optional limits (requests, images)."
    )
    metrics_public: bool = Field(False, description="If true, /metrics needs no key even when keys are set.")
    admin_open: bool = Field(
        False, description="If true and no keys are configured, anyone may load and unload models (else 403)."
    )
    rate_limit_requests: RateLimitText | None = Field(
        None, description="Requests per key (per client address without keys), e.g. 60/minute; a number is per minute."
    )
    rate_limit_images: RateLimitText | None = Field(
        None, description="Images per key (per client address without keys), e.g. 100/minute."
    )
    rate_limit_storage_uri: str = Field(
        "memory://", description="Where counts live: memory:// (one process) or redis://host:6379 (shared)."
    )
    rate_limit_strategy: Literal["moving-window", "fixed-window", "sliding-window-counter"] = "moving-window"
    rate_limit_on_store_error: Literal["allow", "deny"] = Field(
        "allow",
        description="When the rate-limit store cannot be reached: allow (serve, log, count a metric) or deny (503).",
    )
    rate_limit_store_timeout_s: float = Field(
        0.5, gt=0.0, le=1.0, description="Longest wait for the rate-limit store on any call."
    )
    rate_limit_auth_failures: RateLimitText = Field(
        "20/minute", description="Failed API-key checks allowed per client address; beyond, 429."
    )
    cors_allow_origins: StrList = Field(
        default_factory=list, description="Origins browsers may call from (CORS); * for any. Empty: no CORS."
    )

    # Storage for response_format=url, behind fsspec
    storage_url: str | None = Field(
        None, description="s3://bucket/prefix, gs://bucket/prefix or a local folder; default: storage_dir."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for storage_url as JSON (endpoint_url, key, token...)."
    )
    storage_presign: bool = Field(True, description="Hand out presigned URLs where the backend can sign (S3).")
    storage_ttl_s: float | None = Field(3600.0, description="Stored images expire after this; none: keep forever.")
    storage_cleanup_interval_s: float = Field(300.0, description="How often expired images are deleted.")
    storage_max_bytes: int | None = Field(
        None, description="Quota of the local image store; the oldest images are deleted first. None: no quota."
    )

    # Tracing (OpenTelemetry, the `otel` extra)
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        "none",
        description="Where request traces go: none, console (stdout), or otlp (OTLP over HTTP; the standard "
        "OTEL_EXPORTER_OTLP_* variables set its endpoint and headers).",
    )
    otel_service_name: str = Field("diffuser-api", description="service.name of the traces.")

    # Async jobs: a signed POST on every final status (Standard Webhooks)
    job_webhook_url: Annotated[str | None, AfterValidator(_http_url)] = Field(
        None, description="Where a signed POST goes when a job (or batch) ends; none: no webhook."
    )
    job_webhook_secret: Annotated[SecretStr | None, AfterValidator(_webhook_secret)] = Field(
        None,
        description="Signing secret of the webhook in Standard Webhooks form, whsec_ then 24 to 64 random bytes "
        "in base64; needed with job_webhook_url.",
    )
    job_webhook_max_attempts: int = Field(
        5, ge=1, description="Tries per webhook message; retried on connection errors, 5xx and 429."
    )
    job_webhook_timeout_s: float = Field(10.0, gt=0.0, description="How long one webhook POST may take.")

    log_level: str = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line.")

    @field_validator("device", "trusted_proxies", "allowed_hosts", "api_keys", "cors_allow_origins", mode="before")
    @classmethod
    def _lists_from_env(cls, value: object) -> object:
        return split_list(value)

    @field_validator("disabled_tasks", mode="before")
    @classmethod
    def _task_names(cls, value: object) -> object:
        return task_names(value)

    @model_validator(mode="after")
    def _webhook_is_signed(self) -> Settings:
        if self.job_webhook_url is not None and self.job_webhook_secret is None:
            raise ValueError("DIFFUSER_JOB_WEBHOOK_URL needs DIFFUSER_JOB_WEBHOOK_SECRET: every webhook is signed")
        return self


def task_names(value: object) -> object:
    """Let operators write task names loosely: ``masked_edit`` or ``masked edit (inpainting)``.
    Shared with the models file's ``disabled_tasks``."""
    value = split_list(value)
    if not isinstance(value, list):
        return value
    by_key = {task.name.lower(): task for task in Task} | {task.value: task for task in Task}
    return [by_key.get(str(item).lower().replace("-", "_"), item) for item in value]
