"""The three OpenAI image endpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from diffuser_api.api.dependencies import ServiceDep, SettingsDep, allowed_models
from diffuser_api.api.disconnect import cancel_on_disconnect
from diffuser_api.api.errors import describe_error, request_id_of
from diffuser_api.api.fast_json import FastJSONResponse
from diffuser_api.api.forms import read_image_form
from diffuser_api.api.jobs import job_files_base, owner_of, prefers_async, submit_job
from diffuser_api.api.openapi import EDIT_REQUEST_BODY, GENERATION_REQUEST_BODY, VARIATION_REQUEST_BODY
from diffuser_api.api.proxies import proxies_of
from diffuser_api.api.rate_limits import ImagesCharge
from diffuser_api.api.request_record import note_result, note_stream, recording, timed_events
from diffuser_api.api.responses import IMAGE_ROUTE, error_responses, images_answer
from diffuser_api.api.schemas import (
    EditForm,
    EditJSONBody,
    GenerationBody,
    ImageOptions,
    VariationForm,
    reject_unknown_fields,
)
from diffuser_api.api.streaming import sse_response, usage
from diffuser_api.config import Settings
from diffuser_api.domain import Endpoint, ImageRequest, ImagesResult, LoraChoice, Upload
from diffuser_api.engine.job import JobTiming
from diffuser_api.errors import InvalidRequest
from diffuser_api.jobs.file_service import FileService
from diffuser_api.service.images import ImageService, response_quality, response_size
from diffuser_api.service.uploads import decode_data_url

router = APIRouter(tags=["images"])

REQUEST_FIELDS = {field.name for field in dataclasses.fields(ImageRequest)} - {"endpoint", "images", "mask"}


@router.post(
    "/images/generations",
    summary="Create images from a prompt",
    openapi_extra=GENERATION_REQUEST_BODY,
    responses=images_answer(streams=True) | error_responses(*IMAGE_ROUTE),
)
async def create_generation(
    body: GenerationBody, request: Request, service: ServiceDep, settings: SettingsDep
) -> Response:
    return await _run(request, service, settings, Endpoint.GENERATIONS, body, ())


@router.post(
    "/images/edits",
    summary="Edit one or several images (optional mask), multipart or JSON",
    openapi_extra=EDIT_REQUEST_BODY,
    responses=images_answer(streams=True) | error_responses(*IMAGE_ROUTE),
)
async def create_edit(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    if request.headers.get("content-type", "").startswith("application/json"):
        body: EditForm = EditJSONBody.model_validate_json(await request.body())
        images, mask = await json_uploads(body, request.app.state.files, owner_of(request))
    else:
        form = await read_image_form(request, settings)
        body = EditForm.model_validate(form.fields)
        images, mask = form.images, form.mask
    return await _run(request, service, settings, Endpoint.EDITS, body, images, mask)


@router.post(
    "/images/variations",
    summary="Create variations of an image",
    openapi_extra=VARIATION_REQUEST_BODY,
    responses=images_answer(streams=False) | error_responses(*IMAGE_ROUTE),
)
async def create_variation(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    form = await read_image_form(request, settings)
    if form.mask is not None:
        raise InvalidRequest("variations take no mask", param="mask", code="unknown_parameter")
    body = VariationForm.model_validate(form.fields)
    return await _run(request, service, settings, Endpoint.VARIATIONS, body, form.images)


async def _run(
    request: Request,
    service: ImageService,
    settings: Settings,
    endpoint: Endpoint,
    body: ImageOptions,
    images: tuple[Upload, ...],
    mask: Upload | None = None,
) -> Response:
    image_request = build_image_request(settings, endpoint, body, images, mask)
    timing = JobTiming()
    # Images count against the caller's budget only once the service found the request valid,
    # and are given back if its job never ran.
    admit = ImagesCharge(request, timing)
    allowed = allowed_models(request)
    with recording(request, image_request, timing) as record:
        if prefers_async(request):
            return await submit_job(request, image_request, job_files_base(request, settings), allowed=allowed,
                                    admit=admit)
        if image_request.stream:
            async with admit.refunded_if_never_run():
                stream = await service.open_stream(image_request, timing, record.timeline, admit, allowed=allowed)
            note_stream(record, stream)
            request_id = request_id_of(request)
            events = admit.refunded_events(timed_events(record, timing, stream.events))
            return sse_response(
                dataclasses.replace(stream, events=events),
                image_request,
                lambda error: describe_error(error, request_id)[1],
                settings.stream_ping_s,
            )
        work = service.create(
            image_request, files_url_base(request, settings), timing=timing, timeline=record.timeline, admit=admit,
            allowed=allowed,
        )
        async with admit.refunded_if_never_run():
            result, model_id = await cancel_on_disconnect(request, work)
        note_result(record, result, model_id)
    return FastJSONResponse(images_response(result))


def build_image_request(
    settings: Settings, endpoint: Endpoint, body: ImageOptions, images: tuple[Upload, ...], mask: Upload | None
) -> ImageRequest:
    """The parsed body as the service's request; the same for HTTP and WebSocket callers."""
    reject_unknown_fields(body, settings.allow_unknown_fields)
    if endpoint is not Endpoint.GENERATIONS and not images:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
    values = {name: getattr(body, name) for name in REQUEST_FIELDS if hasattr(body, name)}
    if body.loras is not None:
        values["loras"] = tuple(LoraChoice(lora.name, lora.scale) for lora in body.loras)
    return ImageRequest(endpoint=endpoint, images=images, mask=mask, **values)


async def json_uploads(
    body: EditJSONBody, files: FileService, owner: str
) -> tuple[tuple[Upload, ...], Upload | None]:
    """Data URLs, or ``{"file_id": ...}`` naming the caller's own ``vision`` file (as OpenAI allows)."""
    async def read(reference: Any, param: str) -> Upload:
        if reference.file_id is not None:
            return Upload(param=param, data=await files.image_bytes(reference.file_id, owner, param))
        return Upload(param=param, data=decode_data_url(reference.image_url, param=param))

    images = tuple([await read(reference, "images") for reference in body.images])
    return images, (await read(body.mask, "mask") if body.mask is not None else None)


def images_response(result: ImagesResult) -> dict[str, Any]:
    data = [
        {key: value for key, value in dataclasses.asdict(image).items() if value is not None}
        for image in result.images
    ]
    body: dict[str, Any] = {"created": result.created, "data": data, "background": "opaque",
                            "output_format": result.output_format}
    if size := response_size(result.size):
        body["size"] = size
    if quality := response_quality(result.quality):
        body["quality"] = quality
    if result.prompt_tokens is not None:
        body["usage"] = usage(result.prompt_tokens)
    return body


def files_url_base(request: Request, settings: Settings) -> str:
    """Absolute base for url results; forwarded headers count only from trusted proxies."""
    if settings.public_base_url:
        base = settings.public_base_url.rstrip("/")
    else:
        proxies = proxies_of(request)
        scheme = proxies.forwarded_scheme(request) or request.url.scheme
        host = proxies.forwarded_host(request) or request.headers.get("host", request.url.netloc)
        base = f"{scheme}://{host}"
    return f"{base}{settings.api_prefix}/images/files"
