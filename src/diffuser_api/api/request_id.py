"""Gives every request an id (the client's ``X-Request-ID`` or a new one) and logs one line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuser_api.api.request_record import STATE_KEY, RequestRecord

logger = logging.getLogger("diffuser_api.access")

ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so handlers still see client disconnects.

    The outermost middleware: it makes the request's record, which the others fill in, and
    logs it once the response is sent. The path is logged without its query string, where a
    WebSocket client may carry its key.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if ACCEPTABLE_ID.match(sent) else f"req_{uuid.uuid4().hex}"
        record = RequestRecord(request_id, scope.get("method", "WS"), scope["path"])
        state = scope.setdefault("state", {})
        state["request_id"], state[STATE_KEY] = request_id, record
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                record.status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            elif message["type"] == "websocket.accept":
                record.status = 101
            elif message["type"] == "websocket.close" and not record.status:
                record.status = message.get("code", 1000)  # refused before accepting
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            record.duration_s = time.monotonic() - started
            logger.info(record.line(), extra={"request": record.fields()})
