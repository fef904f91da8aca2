"""``WS /v1/images/ws``: one generation or edit per socket, with live progress.

Browsers cannot read SSE from a POST with a body, and progress (queue position, every step)
is richer than OpenAI's events, so this route speaks its own small protocol (README).
Closing the socket cancels the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from diffuser_api.api.auth import accepted_subprotocol
from diffuser_api.api.dependencies import allowed_models
from diffuser_api.api.errors import describe_error
from diffuser_api.api.jobs import owner_of
from diffuser_api.api.json_requests import json_image_request
from diffuser_api.api.rate_limits import ImagesCharge
from diffuser_api.api.request_record import note_stream, recording
from diffuser_api.api.streaming import UNEXPECTED_FAILURE, websocket_message
from diffuser_api.config import Settings
from diffuser_api.domain import ImageRequest
from diffuser_api.engine.job import JobTiming
from diffuser_api.errors import DiffuserError, InvalidRequest
from diffuser_api.jobs.file_service import FileService
from diffuser_api.service.images import ImageService

logger = logging.getLogger(__name__)
router = APIRouter(tags=["images"])

# Close code for "the request was refused" (RFC 6455 policy violation).
REFUSED = 1008


@router.websocket("/images/ws")
async def image_socket(socket: WebSocket) -> None:
    await socket.accept(subprotocol=accepted_subprotocol(socket.scope))
    settings: Settings = socket.app.state.settings
    service: ImageService = socket.app.state.service
    request_id = socket.scope.get("state", {}).get("request_id", "")
    try:
        image_request = await parse_message(await _first_message(socket), settings, socket.app.state.files,
                                            owner_of(socket))
        timing = JobTiming()
        # The session's log line names its work like an HTTP request's does.
        # Images are given back, as on HTTP, if the session's job never ran.
        admit = ImagesCharge(socket, timing)
        with recording(socket, image_request, timing) as record:
            async with admit.refunded_if_never_run():
                stream = await service.open_stream(
                    image_request, timing, record.timeline, admit=admit, allowed=allowed_models(socket)
                )
                note_stream(record, stream)
                await _serve(socket, stream.events)
    except WebSocketDisconnect:
        return
    except DiffuserError as error:
        await _refuse(socket, error, request_id)
    except Exception:  # accepted already: an error message is all the client can still get
        logger.exception("unhandled error in the WebSocket session of request %s", request_id)
        await _refuse(socket, DiffuserError(UNEXPECTED_FAILURE), request_id)


async def _refuse(socket: WebSocket, error: DiffuserError, request_id: str) -> None:
    await socket.send_json({"type": "error", **describe_error(error, request_id)[1]})
    await socket.close(REFUSED)


async def _serve(socket: WebSocket, events: Any) -> None:
    """Send the events while watching the socket: a client that leaves cancels the work."""
    work = asyncio.ensure_future(_send_events(socket, events))
    closed = asyncio.ensure_future(socket.receive())
    await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():  # the client left (or spoke out of turn): stop the work
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return
    closed.cancel()
    work.result()
    await socket.send_json({"type": "done"})
    await socket.close()


async def _send_events(socket: WebSocket, events: Any) -> None:
    async for event in events:
        await socket.send_json(websocket_message(event))


async def _first_message(socket: WebSocket) -> Any:
    """The first message's JSON; a binary frame or text that is not JSON is the client's error."""
    message = await socket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    if message.get("text") is None:
        raise InvalidRequest("send the request as a text message (one JSON object), not a binary one",
                             code="invalid_json")
    try:
        return json.loads(message["text"])
    except json.JSONDecodeError:
        raise InvalidRequest("the message is not valid JSON: send one JSON object, a generations or edits request",
                             code="invalid_json") from None


async def parse_message(message: Any, settings: Settings, files: FileService, owner: str) -> ImageRequest:
    """The first message is a generations or edits JSON body plus ``"endpoint"``."""
    if not isinstance(message, dict):
        raise InvalidRequest("send one JSON object: a generations or edits request", code="invalid_json")
    fields = dict(message)
    endpoint = fields.pop("endpoint", "generations")
    request = await json_image_request(fields, endpoint, settings, files, owner)
    # The socket itself is the stream: progress flows whatever the body's "stream" says.
    return dataclasses.replace(request, stream=True)
