"""Streamed answers: OpenAI's SSE events, and the messages of the progress WebSocket.

SSE follows OpenAI's framing exactly (``event: <type>`` + one-line JSON whose ``type`` the
SDK reads); any error after the stream started, a bug of ours included, is one event whose
JSON has an ``error`` object, which the SDK raises: never a silent end of the stream.
Nothing here sends ``id:`` or ``retry:`` lines: the SDK would choke on the empty data that
follows them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from diffuser_api.domain import Endpoint, ImageRequest
from diffuser_api.errors import DiffuserError
from diffuser_api.service.images import response_quality, response_size
from diffuser_api.service.streaming import Completed, ImageStream, Loading, PartialImage, Queued, Step, StreamEvent

logger = logging.getLogger(__name__)

# What a client is told of a bug of ours; the log has the exception, with the request id.
UNEXPECTED_FAILURE = "The server had an error while processing your request."
# Variations never stream synchronously; their async jobs' events use the third prefix.
EVENT_PREFIX = {Endpoint.GENERATIONS: "image_generation", Endpoint.EDITS: "image_edit",
                Endpoint.VARIATIONS: "image_variation"}


def usage(prompt_tokens: int | None) -> dict[str, Any]:
    """Text tokens as the encoder saw them; diffusers has no notion of image tokens."""
    text = prompt_tokens or 0
    return {
        "total_tokens": text,
        "input_tokens": text,
        "output_tokens": 0,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
    }


def openai_event(event: StreamEvent, request: ImageRequest, size: str) -> dict[str, Any] | None:
    """The OpenAI JSON of an event, or None for events OpenAI's stream has no type for
    (``Loading``, ``Queued``, ``Step``): the ``: ping`` comments keep such a stream alive."""
    common = {
        "created_at": int(time.time()),
        "size": response_size(size) or "auto",
        "quality": response_quality(request.quality) or "auto",
        "background": "opaque",
        "output_format": request.output_format or "png",
    }
    prefix = EVENT_PREFIX[request.endpoint]
    several = request.n > 1
    if isinstance(event, PartialImage):
        body = {"type": f"{prefix}.partial_image", "b64_json": event.b64_json, **common,
                "partial_image_index": event.partial_image_index}
        return body | ({"image_index": event.image_index} if several else {})
    if isinstance(event, Completed):
        body = {"type": f"{prefix}.completed", "b64_json": event.image.b64_json, **common,
                "usage": usage(event.prompt_tokens), "seed": event.image.seed}
        return body | ({"image_index": event.image_index} if several else {})
    return None


def websocket_message(event: StreamEvent) -> dict[str, Any]:
    if isinstance(event, Loading):
        return {"type": "loading"}
    if isinstance(event, Queued):
        return {"type": "queued", "position": event.position}
    if isinstance(event, Step):
        return {"type": "progress", "step": event.step, "total_steps": event.total}
    if isinstance(event, PartialImage):
        return {"type": "partial_image", "image_index": event.image_index,
                "partial_image_index": event.partial_image_index, "b64_json": event.b64_json}
    return {"type": "completed", "image_index": event.image_index, "b64_json": event.image.b64_json,
            "seed": event.image.seed, "revised_prompt": event.image.revised_prompt}


def sse_response(
    stream: ImageStream, request: ImageRequest, error_body: Any, ping_s: float
) -> EventSourceResponse:
    """``error_body(error)`` renders a failure after the stream started as the envelope."""

    async def frames() -> AsyncIterator[ServerSentEvent]:
        size = f"{stream.job.width}x{stream.job.height}"
        try:
            async for event in stream.events:
                body = openai_event(event, request, size)
                if body is not None:
                    # Image events carry base64 images: orjson writes them several times faster.
                    yield ServerSentEvent(data=orjson.dumps(body).decode(), event=body["type"])
        except DiffuserError as error:
            yield ServerSentEvent(data=json.dumps(error_body(error)), event="error")
        except Exception:  # a 200 is already sent: the error event is all the client can still get
            body = error_body(DiffuserError(UNEXPECTED_FAILURE))
            logger.exception("unhandled error in the stream of request %s", body["error"]["request_id"])
            yield ServerSentEvent(data=json.dumps(body), event="error")

    return EventSourceResponse(
        frames(), ping=ping_s, ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        headers={"cache-control": "no-cache"},
    )
