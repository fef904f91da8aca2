"""``/v1/batches``: OpenAI's Batch API for image generations and edits.

OpenAI's batch object (checked against the ``openai`` SDK's types): create from an uploaded
JSONL file, poll, list, cancel; the output and error files are read through ``/v1/files``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from diffuser_api.api.dependencies import SettingsDep, allowed_models
from diffuser_api.api.errors import request_id_of
from diffuser_api.api.images import files_url_base
from diffuser_api.api.jobs import owner_of
from diffuser_api.api.openai_files import checked_expiry, idempotency_key_of
from diffuser_api.api.rate_limits import RateLimiter
from diffuser_api.api.responses import error_responses
from diffuser_api.jobs.batch_service import BatchService, BatchState

router = APIRouter(tags=["batches"])

MAX_METADATA = 16


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: str
    seconds: int


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=MAX_METADATA)
    output_expires_after: ExpiresAfter | None = None


def batches_of(request: Request) -> BatchService:
    return request.app.state.batches


def rate_limiter_of(request: Request) -> RateLimiter:
    """Whose image limit the batch's lines are charged to as they run."""
    return request.app.state.rate_limiter


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(state: BatchState) -> dict[str, Any]:
    batch, counts = state.batch, state.counts
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status.value, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at), "in_progress_at": _seconds(batch.in_progress_at),
        "expires_at": int(batch.expires_at), "finalizing_at": _seconds(batch.finalizing_at),
        "completed_at": _seconds(batch.completed_at), "failed_at": _seconds(batch.failed_at),
        "expired_at": _seconds(batch.expired_at), "cancelling_at": _seconds(batch.cancelling_at),
        "cancelled_at": _seconds(batch.cancelled_at),
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": batch.metadata,
    }


@router.post("/batches", summary="Create a batch from an uploaded JSONL file", responses=error_responses(400))
async def create_batch(body: BatchBody, request: Request, settings: SettingsDep) -> Response:
    service = batches_of(request)
    expiry = body.output_expires_after
    record = await service.create(
        owner=owner_of(request), request_id=request_id_of(request), input_file_id=body.input_file_id,
        endpoint=body.endpoint, completion_window=body.completion_window, metadata=body.metadata,
        output_expires_after_s=None if expiry is None else checked_expiry(expiry.anchor, expiry.seconds,
                                                                          "output_expires_after"),
        allowed=allowed_models(request), url_base=files_url_base(request, settings),
        idempotency_key=idempotency_key_of(request), charge_to=rate_limiter_of(request).identity_of(request),
    )
    return JSONResponse(batch_object(await service.state(record)))


@router.get("/batches", summary="List your batches, newest first", responses=error_responses(400))
async def list_batches(
    request: Request,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    service = batches_of(request)
    records, has_more = await service.list(owner_of(request), after=after, limit=limit)
    data = [batch_object(await service.state(record)) for record in records]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@router.get("/batches/{batch_id}", summary="A batch: its status and request counts", responses=error_responses(404))
async def get_batch(batch_id: str, request: Request) -> Response:
    service = batches_of(request)
    return JSONResponse(batch_object(await service.state(await service.get(batch_id, owner_of(request)))))


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch: queued lines never run, running ones finish",
             responses=error_responses(404, 409))
async def cancel_batch(batch_id: str, request: Request) -> Response:
    service = batches_of(request)
    return JSONResponse(batch_object(await service.state(await service.cancel(batch_id, owner_of(request)))))
