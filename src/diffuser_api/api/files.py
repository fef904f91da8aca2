"""Serves ``response_format=url`` images that are not handed out as presigned URLs.

Public even when API keys are on: the names are unguessable, like presigned URLs, so browsers
and clients can fetch results without a key.
"""

from __future__ import annotations

import asyncio
import math

from fastapi import APIRouter
from fastapi.responses import Response

from diffuser_api.api.dependencies import StorageDep
from diffuser_api.api.responses import IMAGE_FILE_ANSWER, error_responses
from diffuser_api.service.encoding import MEDIA_TYPES

router = APIRouter(tags=["images"])

# Kept forever (no time to live): a year, the longest max-age caches are told to honour.
FOREVER_S = 365 * 24 * 3600


@router.get(
    "/images/files/{name}", summary="Download an image returned as a url", response_class=Response,
    responses=IMAGE_FILE_ANSWER | error_responses(404, keyed=False),
)
async def image_file(name: str, storage: StorageDep) -> Response:
    # Object stores answer over the network: off the event loop.
    data = await asyncio.to_thread(storage.read, name)
    media_type = MEDIA_TYPES[name.rsplit(".", 1)[-1]]
    return Response(data, media_type=media_type, headers=file_headers(storage.remaining_s(name)))


def file_headers(remaining_s: float | None) -> dict[str, str]:
    """A name's bytes never change, so caches may keep them as long as the image lives, not
    longer (a cached copy would outlive its deletion); ``private`` keeps them out of shared
    caches. ``nosniff``: browsers take the bytes as the image type we say, never as HTML."""
    max_age = FOREVER_S if remaining_s is None else max(0, math.floor(remaining_s))
    return {"cache-control": f"private, max-age={max_age}, immutable", "x-content-type-options": "nosniff"}
