"""``/v1/files``: upload batch input files and vision images, list, read, download, delete.

OpenAI's file object and list shapes (checked against the ``openai`` SDK's types).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from diffuser_api.api.file_uploads import FileForm, read_file_form
from diffuser_api.api.jobs import MAX_IDEMPOTENCY_KEY, owner_of
from diffuser_api.api.responses import error_responses
from diffuser_api.errors import InvalidRequest
from diffuser_api.jobs.file_records import FileRecord
from diffuser_api.jobs.file_service import FileService, RepeatedUpload

router = APIRouter(tags=["files"])

ANCHOR = "created_at"
# OpenAI's bounds for expires_after.seconds: an hour to 30 days.
EXPIRES_AFTER_S = (3600, 30 * 24 * 3600)


def files_of(request: Request) -> FileService:
    return request.app.state.files


def idempotency_key_of(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                             param="Idempotency-Key", code="invalid_value")
    return key


def file_object(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id, "object": "file", "bytes": record.bytes, "created_at": int(record.created_at),
        "expires_at": None if record.expires_at is None else int(record.expires_at), "filename": record.filename,
        "purpose": record.purpose.value, "status": "processed", "status_details": None,
    }


def expires_after_of(fields: dict[str, str], param: str = "expires_after") -> float | None:
    """``expires_after[anchor]=created_at`` and ``expires_after[seconds]=N``, as the SDKs send it."""
    anchor = fields.get(f"{param}[anchor]")
    seconds = fields.get(f"{param}[seconds]")
    if anchor is None and seconds is None:
        return None
    return checked_expiry(anchor, seconds, param)


def checked_expiry(anchor: Any, seconds: Any, param: str) -> float:
    if anchor != ANCHOR:
        raise InvalidRequest(f"{param}.anchor must be '{ANCHOR}'", param=f"{param}.anchor", code="invalid_value")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = 0
    low, high = EXPIRES_AFTER_S
    if not low <= value <= high:
        raise InvalidRequest(f"{param}.seconds must be an integer from {low} to {high}", param=f"{param}.seconds",
                             code="invalid_value")
    return float(value)


@router.post("/files", summary="Upload a file: a JSONL batch input (purpose 'batch') or an image ('vision')",
             responses=error_responses(400, 413))
async def create_file(request: Request) -> Response:
    files = files_of(request)
    owner = owner_of(request)
    key = idempotency_key_of(request)
    earlier = await files.earlier_upload(owner, key)
    if earlier is not None:
        return JSONResponse(file_object(earlier))
    form = FileForm()
    try:
        async with files.upload(owner) as upload:
            await read_file_form(request, form, upload)
            if "purpose" not in form.fields:
                raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                                     code="missing_required_parameter")
            record = await files.commit(upload, owner=owner, filename=form.filename or "upload",
                                        expires_after_s=expires_after_of(form.fields), idempotency_key=key)
    except RepeatedUpload as repeated:
        record = repeated.earlier
    return JSONResponse(file_object(record))


@router.get("/files", summary="List your files", responses=error_responses(400))
async def list_files(
    request: Request,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    records, has_more = await files_of(request).list(owner_of(request), purpose=purpose, after=after, limit=limit,
                                                     ascending=order == "asc")
    data = [file_object(record) for record in records]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@router.get("/files/{file_id}", summary="A file's object", responses=error_responses(404))
async def get_file(file_id: str, request: Request) -> Response:
    return JSONResponse(file_object(await files_of(request).get(file_id, owner_of(request))))


@router.get("/files/{file_id}/content", summary="Download a file's bytes", response_class=Response,
            responses=error_responses(404))
async def file_content(file_id: str, request: Request) -> Response:
    record, chunks = await files_of(request).content(file_id, owner_of(request))
    media_type = "application/jsonl" if record.filename.endswith(".jsonl") else "application/octet-stream"
    return StreamingResponse(chunks, media_type=media_type, headers={
        "content-length": str(record.bytes), "x-content-type-options": "nosniff",
        "content-disposition": f'attachment; filename="{record.id}"',
    })


@router.delete("/files/{file_id}", summary="Delete a file", responses=error_responses(404))
async def delete_file(file_id: str, request: Request) -> Response:
    await files_of(request).delete(file_id, owner_of(request))
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
