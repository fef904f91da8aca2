"""Request bodies are capped and timed while they are read, before any route parses them.

A pure ASGI middleware wrapping ``receive``: whatever reads the body (FastAPI's JSON parsing,
the multipart reader, a route added later) sees at most its route's cap, and a client that
stalls mid-body is answered 408 instead of holding a request open. A ``Content-Length`` over
the cap is answered at once, before a byte of the body is read.

Clients such as httpx and the openai SDK send the whole body before they read the answer, so
a server that stops reading leaves them blocked on a full socket, and they never see the 413.
After any answer given before the body ended (ours, or a route's or the key check's early
refusal) the rest of the body is therefore read and dropped, never stored, up to
``max_discard_bytes``; the connection is then closed, so past that bound the client sees the
connection go rather than the server reading on forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuser_api.api.errors import diffuser_error_handler
from diffuser_api.config import Settings
from diffuser_api.errors import BodyTimeout, DiffuserError, PayloadTooLarge

# What the app is told once its body was refused: the client is gone, as far as it is concerned.
DISCONNECT: Message = {"type": "http.disconnect"}
CLOSE_HEADER = (b"connection", b"close")


@dataclass(frozen=True)
class BodyLimits:
    """Each route's cap on its whole body; the settings are the only source."""

    json_bytes: int
    large_bytes: int
    large_paths: frozenset[str]
    file_bytes: int
    file_path: str
    discard_bytes: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        prefix = settings.api_prefix
        return cls(
            json_bytes=settings.max_json_bytes,
            large_bytes=settings.max_edit_bytes,
            # Only the routes that take images may have bodies of megabytes.
            large_paths=frozenset({f"{prefix}/images/edits", f"{prefix}/images/variations"}),
            # Uploads to the Files API have their own cap (a batch file may be 200 MB).
            file_bytes=settings.max_file_bytes,
            file_path=f"{prefix}/files",
            discard_bytes=settings.max_discard_bytes,
            timeout_s=settings.body_timeout_s,
        )

    def cap_for(self, path: str) -> int:
        if path == self.file_path:
            return self.file_bytes
        return self.large_bytes if path in self.large_paths else self.json_bytes


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await LimitedBody(scope, receive, send, self._limits).serve(self.app)


class LimitedBody:
    """One request's body as the app sees it: counted, timed, and cut off at the cap."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, limits: BodyLimits) -> None:
        headers = Headers(scope=scope)
        self._scope = scope
        self._receive = receive
        self._send = send
        self._limits = limits
        self._cap = limits.cap_for(scope["path"])
        self._declared = declared_length(headers)
        self._expects_continue = headers.get("expect", "").lower() == "100-continue"
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        # True once nothing more of the body will be read: it ended, or we gave up on it.
        self._ended = self._declared == 0 or (self._declared is None and not chunked)
        self._received = 0
        self._answered = False  # we answered for the app: its own answer is dropped
        self._cut_off = False  # the app reads no more of the body: it is told the client left
        self._response_started = False

    async def serve(self, app: ASGIApp) -> None:
        if self._declared is not None and self._declared > self._cap:
            await self._answer(self._too_large())
            return
        try:
            await app(self._scope, self.receive, self.send)
        except ClientDisconnect:
            if not self._cut_off:  # a real disconnect is not ours to hide
                raise

    async def receive(self) -> Message:
        if self._cut_off:
            return DISCONNECT
        if self._ended:  # the body is in; the app only waits for a disconnect, however long
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self._limits.timeout_s)
        except TimeoutError:
            # Nothing to drain from a client that stopped sending: answer and close.
            self._ended = True
            await self._refuse(BodyTimeout(
                f"The request body made no progress for {self._limits.timeout_s:g} s; send it without pauses."
            ))
            return DISCONNECT
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            self._ended = not message.get("more_body", False)
            if self._received > self._cap:
                await self._refuse(self._too_large())
                return DISCONNECT
        else:
            self._ended = True
        return message

    async def send(self, message: Message) -> None:
        """The app's answer; one given before the body ended drains it and closes the connection."""
        if self._answered:
            return  # the app's reaction to a body we refused: the client has our answer already
        if message["type"] == "http.response.start":
            self._response_started = True
            if not self._ended:
                message = {**message, "headers": [*message.get("headers", []), CLOSE_HEADER]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False) and not self._ended:
            await self._send({**message, "more_body": True})
            await self._drain()
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await self._send(message)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body is larger than {self._cap} bytes, the limit of "
            f"{self._scope.get('method', 'POST')} {self._scope['path']}.",
            code="payload_too_large",
        )

    async def _refuse(self, error: DiffuserError) -> None:
        """Refuse the body the app is reading; once it has started answering it can only be cut off."""
        self._cut_off = True
        if not self._response_started:
            await self._answer(error)

    async def _answer(self, error: DiffuserError) -> None:
        """The error envelope, sent at once; then the rest of the body is dropped and the connection closed."""
        self._answered = self._cut_off = True
        response = await diffuser_error_handler(HTTPConnection(self._scope), error)
        await self._send({
            "type": "http.response.start", "status": response.status_code,
            "headers": [*response.raw_headers, CLOSE_HEADER],
        })
        await self._send({"type": "http.response.body", "body": response.body, "more_body": True})
        await self._drain()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self) -> None:
        """Read and drop what is left of the body, up to the discard bound and while it makes progress."""
        if self._expects_continue and self._received == 0:
            return  # the client waits for a 100 Continue it will not get: it sends nothing more
        if self._declared is not None and self._declared - self._received > self._limits.discard_bytes:
            return  # more than we would read anyway: close at once
        dropped = 0
        while not self._ended and dropped <= self._limits.discard_bytes:
            try:
                message = await asyncio.wait_for(self._receive(), self._limits.timeout_s)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            self._ended = not message.get("more_body", False)


def declared_length(headers: Headers) -> int | None:
    """The ``Content-Length`` the client declared; the server has already refused a malformed one."""
    value = headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None
