"""Async jobs over HTTP: ``Prefer: respond-async`` on the image routes, and /images/jobs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import HTTPConnection

from diffuser_api import errors
from diffuser_api.api.auth import api_key_of
from diffuser_api.api.dependencies import SettingsDep
from diffuser_api.api.errors import describe_error, envelope, error_kind, request_id_of
from diffuser_api.api.files import file_headers
from diffuser_api.api.job_responses import ImageJobDeleted, ImageJobList, ImageJobObject
from diffuser_api.api.responses import IMAGE_FILE_ANSWER, error_responses
from diffuser_api.api.streaming import UNEXPECTED_FAILURE, openai_event, usage
from diffuser_api.config import Settings
from diffuser_api.domain import ImageRequest, StoredImage
from diffuser_api.errors import DiffuserError, InvalidRequest
from diffuser_api.jobs.records import JobRecord, JobStatus
from diffuser_api.jobs.requests import restore_request
from diffuser_api.jobs.service import JobService, JobState
from diffuser_api.service.encoding import MEDIA_TYPES
from diffuser_api.service.images import response_quality, response_size
from diffuser_api.service.storage import ImageStorage
from diffuser_api.service.streaming import Completed, PartialImage, Step

logger = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

PREFERENCE = "respond-async"
MAX_IDEMPOTENCY_KEY = 255
JOB_ROUTE = (404, 410)
FINAL_EVENT = {JobStatus.COMPLETED: "image.job.completed", JobStatus.FAILED: "image.job.failed",
               JobStatus.CANCELLED: "image.job.cancelled"}


def prefers_async(request: Request) -> bool:
    """RFC 7240: ``Prefer`` holds comma-separated preferences, each maybe with parameters."""
    return any(
        preference.split(";", 1)[0].split("=", 1)[0].strip().lower() == PREFERENCE
        for value in request.headers.getlist("prefer")
        for preference in value.split(",")
    )


def owner_of(connection: HTTPConnection) -> str:
    """The caller's key name; without keys every job belongs to one anonymous owner."""
    key = api_key_of(connection)
    return "" if key is None else key.name


def jobs_of(request: Request) -> JobService:
    return request.app.state.jobs


async def submit_job(
    request: Request, image_request: ImageRequest, url_base: str, *, allowed: frozenset[str] | None, admit: Any
) -> Response:
    """Checked as the synchronous request would be, stored, then 202 with the job."""
    settings: Settings = request.app.state.settings
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                             param="Idempotency-Key", code="invalid_value")
    service = jobs_of(request)
    submitted = await service.submit(
        image_request, owner=owner_of(request), request_id=request_id_of(request), idempotency_key=key,
        allowed=allowed, admit=admit,
    )
    job = submitted.job
    logger.info("job %s stored for request %s (model %s)%s", job.id, request_id_of(request), job.model,
                "" if submitted.created else " earlier, same Idempotency-Key")
    body = await job_object(await service.state(job), service.storage, url_base)
    return JSONResponse(body, status_code=202, headers={
        "location": f"{settings.api_prefix}/images/jobs/{job.id}", "preference-applied": PREFERENCE,
    })


async def job_object(state: JobState, storage: ImageStorage, url_base: str, *,
                     images_as_urls: bool = False) -> dict[str, Any]:
    """``images_as_urls``: a completed job's images by ``url`` whatever ``response_format`` said
    (a list page of 100 jobs of ten 1024x1024 images in base64 would be about 2 GB)."""
    job = state.job
    return {
        "id": job.id,
        "object": "image.job",
        "status": job.status.value,
        "endpoint": job.endpoint,
        "model": job.model,
        "created_at": int(job.created_at),
        "started_at": _seconds(job.started_at),
        "completed_at": _seconds(job.completed_at),
        "expires_at": _seconds(job.expires_at),
        "progress": job.progress,
        "queue_position": state.queue_position,
        "attempts": job.attempts,
        "result": (await _result(job, storage, url_base, as_url=True if images_as_urls else None)
                   if job.status is JobStatus.COMPLETED else None),
        "error": _error(job),
    }


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


async def _result(job: JobRecord, storage: ImageStorage, url_base: str, *,
                  as_url: bool | None = None) -> dict[str, Any] | None:
    """The images response, as ``response_format`` asked unless ``as_url`` says: the images are
    read from storage."""
    result = job.result
    if result is None:
        return None
    data = []
    if as_url is None:
        as_url = job.request.get("response_format") == "url"
    for image in await _stored_images(job, storage, url_base, as_url=as_url):
        data.append({key: value for key, value in
                     (("b64_json", image.b64_json), ("url", image.url), ("revised_prompt", image.revised_prompt),
                      ("seed", image.seed)) if value is not None})
    body: dict[str, Any] = {"created": result["created"], "data": data, "background": "opaque",
                            "output_format": result["output_format"]}
    if size := response_size(result["size"]):
        body["size"] = size
    if quality := response_quality(result.get("quality")):
        body["quality"] = quality
    if result.get("prompt_tokens") is not None:
        body["usage"] = usage(result["prompt_tokens"])
    return body


async def _stored_images(job: JobRecord, storage: ImageStorage, url_base: str, *, as_url: bool) -> list[StoredImage]:
    images = []
    for image in (job.result or {}).get("images", []):
        common = {"seed": image["seed"], "revised_prompt": image.get("revised_prompt")}
        if as_url:
            images.append(StoredImage(url=storage.url(image["name"], url_base), **common))
        else:
            data = await asyncio.to_thread(storage.read, image["name"])
            images.append(StoredImage(b64_json=base64.b64encode(data).decode("ascii"), **common))
    return images


def _error(job: JobRecord) -> dict[str, Any] | None:
    if job.error is None:
        return None
    kind = getattr(errors, str(job.error.get("class")), DiffuserError)
    if not (isinstance(kind, type) and issubclass(kind, DiffuserError)):
        kind = DiffuserError
    _, error_type, _ = error_kind(kind)
    return envelope(job.request_id, job.error["message"], error_type, job.error.get("param"),
                    job.error.get("code"))["error"]


def job_files_base(request: Request, settings: Settings) -> str:
    from diffuser_api.api.images import files_url_base  # the image routes import this module

    return f"{files_url_base(request, settings)}/jobs"


@router.get("/images/jobs", summary="List your async jobs, newest first",
            responses={200: {"model": ImageJobList}} | error_responses(400))
async def list_jobs(
    request: Request,
    settings: SettingsDep,
    status: JobStatus | None = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    service = jobs_of(request)
    records, has_more = await service.list(owner_of(request), status=status, after=after, limit=limit)
    base = job_files_base(request, settings)
    data = [await job_object(await service.state(record), service.storage, base, images_as_urls=True)
            for record in records]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": has_more})


@router.get("/images/jobs/{job_id}", summary="An async job: its status, progress and result",
            responses={200: {"model": ImageJobObject}} | error_responses(*JOB_ROUTE))
async def get_job(job_id: str, request: Request, settings: SettingsDep) -> Response:
    service = jobs_of(request)
    record = await service.get(job_id, owner_of(request))
    return JSONResponse(await job_object(await service.state(record), service.storage,
                                         job_files_base(request, settings)))


@router.post("/images/jobs/{job_id}/cancel", summary="Cancel a job: queued never runs, running stops at its next step",
             responses={200: {"model": ImageJobObject}} | error_responses(409, *JOB_ROUTE))
async def cancel_job(job_id: str, request: Request, settings: SettingsDep) -> Response:
    service = jobs_of(request)
    record = await service.cancel(job_id, owner_of(request))
    return JSONResponse(await job_object(await service.state(record), service.storage,
                                         job_files_base(request, settings)))


@router.delete("/images/jobs/{job_id}", summary="Delete a job and its stored images",
               responses={200: {"model": ImageJobDeleted}} | error_responses(*JOB_ROUTE))
async def delete_job(job_id: str, request: Request) -> Response:
    await jobs_of(request).delete(job_id, owner_of(request))
    return JSONResponse({"id": job_id, "object": "image.job.deleted", "deleted": True})


@router.get("/images/files/jobs/{name}", summary="Download an image of a job returned as a url",
            response_class=Response, responses=IMAGE_FILE_ANSWER | error_responses(404, keyed=False))
async def job_image_file(name: str, request: Request) -> Response:
    storage = jobs_of(request).storage
    data = await asyncio.to_thread(storage.read, name)
    return Response(data, media_type=MEDIA_TYPES[name.rsplit(".", 1)[-1]], headers=file_headers(None))


@router.get("/images/jobs/{job_id}/events", summary="Follow a job: its state, progress, images and outcome (SSE)",
            responses={200: {"description": "A text/event-stream of job events",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
            | error_responses(*JOB_ROUTE))
async def job_events(job_id: str, request: Request, settings: SettingsDep) -> Response:
    service = jobs_of(request)
    owner = owner_of(request)
    await service.get(job_id, owner)  # 404 or 410 as plain HTTP, before the stream starts
    request_id = request_id_of(request)
    base = job_files_base(request, settings)

    async def frames() -> AsyncIterator[ServerSentEvent]:
        try:
            async for frame in _job_frames(service, job_id, owner, base):
                yield frame
        except DiffuserError as error:
            yield ServerSentEvent(data=json.dumps(describe_error(error, request_id)[1]), event="error")
        except Exception:  # the 200 is sent: an error event is all the client can still get
            logger.exception("unhandled error in the events of job %s (request %s)", job_id, request_id)
            body = describe_error(DiffuserError(UNEXPECTED_FAILURE), request_id)[1]
            yield ServerSentEvent(data=json.dumps(body), event="error")

    return EventSourceResponse(frames(), ping=settings.stream_ping_s,
                               ping_message_factory=lambda: ServerSentEvent(comment="ping"),
                               headers={"cache-control": "no-cache"})


def _frame(body: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(body), event=body["type"])


async def _job_frames(service: JobService, job_id: str, owner: str, url_base: str) -> AsyncIterator[ServerSentEvent]:
    request: ImageRequest | None = None
    async for event in service.follow(job_id, owner):
        if isinstance(event, Step):
            yield _frame({"type": "image.job.progress", "status": "in_progress", "queue_position": None,
                          "step": event.step, "total_steps": event.total, "image_index": None})
        elif isinstance(event, PartialImage):
            assert request is not None
            body = openai_event(event, request, request.size or "auto")
            if body is not None:
                yield _frame(body)
        elif event.job.finished:
            async for frame in _final_frames(service, event, url_base):
                yield frame
        else:
            job = event.job
            request = request or restore_request(job.endpoint, job.request, [])
            yield _frame({"type": "image.job.progress", "status": job.status.value,
                          "queue_position": event.queue_position, "step": job.step, "total_steps": job.total_steps,
                          "image_index": job.image_index})


async def _final_frames(service: JobService, state: JobState, url_base: str) -> AsyncIterator[ServerSentEvent]:
    """One ``…completed`` event per image (with its image), then the job's final event, whose
    job gives the images by ``url``: sent again in base64 they would double the stream."""
    job = state.job
    if job.status is JobStatus.COMPLETED and job.result is not None:
        request = restore_request(job.endpoint, {**job.request, "response_format": "b64_json"}, [])
        for index, image in enumerate(await _stored_images(job, service.storage, url_base, as_url=False)):
            body = openai_event(Completed(index, image, job.result.get("prompt_tokens")), request,
                                job.result["size"])
            if body is not None:
                yield _frame(body)
    yield _frame({"type": FINAL_EVENT[job.status],
                  "job": await job_object(state, service.storage, url_base, images_as_urls=True)})
