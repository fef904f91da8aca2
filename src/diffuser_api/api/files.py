"""Serves ``response_format=url`` images that are not handed out as presigned URLs.

Public even when API keys are on: the names are unguessable, like presigned URLs, so browsers
and clients can fetch results without a key.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from diffuser_api.api.dependencies import StorageDep
from diffuser_api.api.responses import IMAGE_FILE_ANSWER, error_responses
from diffuser_api.service.encoding import MEDIA_TYPES

router = APIRouter(tags=["images"])


@router.get(
    "/images/files/{name}", summary="Download an image returned as a url", response_class=Response,
    responses=IMAGE_FILE_ANSWER | error_responses(404, keyed=False),
)
async def image_file(name: str, storage: StorageDep) -> Response:
    # Object stores answer over the network: off the event loop.
    data = await asyncio.to_thread(storage.read, name)
    return Response(data, media_type=MEDIA_TYPES[name.rsplit(".", 1)[-1]],
                    headers={"cache-control": "private, max-age=3600"})
