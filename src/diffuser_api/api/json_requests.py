"""A generations or edits request given as a JSON object outside its own route: a WebSocket's
first message, or a line of a batch. Parsed by the very schemas the HTTP routes use, so each
refuses exactly what the synchronous route refuses."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from diffuser_api.api.errors import invalid_request_from
from diffuser_api.api.images import build_image_request, json_uploads
from diffuser_api.api.schemas import EditForm, EditJSONBody, GenerationBody
from diffuser_api.config import Settings
from diffuser_api.domain import Endpoint, ImageRequest, Upload
from diffuser_api.errors import InvalidRequest
from diffuser_api.jobs.batch_service import ParseBody
from diffuser_api.jobs.file_service import FileService

JSON_ENDPOINTS = ("generations", "edits")


async def json_image_request(
    fields: dict[str, Any], endpoint: str, settings: Settings, files: FileService, owner: str
) -> ImageRequest:
    images: tuple[Upload, ...] = ()
    mask: Upload | None = None
    body: GenerationBody | EditForm
    try:
        if endpoint == "generations":
            body = GenerationBody.model_validate(fields)
        elif endpoint == "edits":
            edit = EditJSONBody.model_validate(fields)
            images, mask = await json_uploads(edit, files, owner)
            body = edit
        else:
            raise InvalidRequest(f"endpoint must be one of: {', '.join(JSON_ENDPOINTS)}", param="endpoint",
                                 code="invalid_value")
    except ValidationError as error:
        raise invalid_request_from(list(error.errors())) from None
    return build_image_request(settings, Endpoint(endpoint), body, images, mask)


def batch_body_parser(settings: Settings, files: FileService) -> ParseBody:
    """The batch service's ``parse_body``: a line's body, as its synchronous route parses it."""

    async def parse(endpoint: str, body: dict[str, Any], owner: str) -> ImageRequest:
        return await json_image_request(body, endpoint, settings, files, owner)

    return parse
