"""An ``ImageRequest`` as a job stores it: its fields as JSON, its uploads as rows of bytes.

pydantic dumps and rebuilds the dataclass field by field, so fields other features add to
``ImageRequest`` (nested dataclasses included) are stored and restored without a change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import TypeAdapter

from diffuser_api.domain import Endpoint, ImageRequest, Upload

REQUEST = TypeAdapter(ImageRequest)
MASK = "mask"
UPLOADS = {"endpoint", "images", "mask"}


def request_fields(request: ImageRequest) -> dict[str, Any]:
    return REQUEST.dump_python(request, mode="json", exclude=UPLOADS)


def request_inputs(request: ImageRequest) -> list[tuple[str, bytes]]:
    """The uploads in order, the mask last."""
    inputs = [(upload.param, upload.data) for upload in request.images]
    if request.mask is not None:
        inputs.append((MASK, request.mask.data))
    return inputs


def restore_request(endpoint: str, fields: dict[str, Any], inputs: list[tuple[str, bytes]]) -> ImageRequest:
    images = tuple(Upload(param=param, data=data) for param, data in inputs if param != MASK)
    mask = next((Upload(param=param, data=data) for param, data in inputs if param == MASK), None)
    return REQUEST.validate_python({**fields, "endpoint": Endpoint(endpoint), "images": images, "mask": mask})


def as_checked(request: ImageRequest) -> ImageRequest:
    """What the synchronous checks see: a job's previews go to its events, not to a stream of
    the request, so ``partial_images`` needs no ``stream`` here (its range is the schema's)."""
    return dataclasses.replace(request, partial_images=None)
