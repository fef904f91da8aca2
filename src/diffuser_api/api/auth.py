"""API keys: checked before any route runs, for HTTP and WebSocket alike.

A middleware rather than a route dependency, so a request without a valid key is refused
before its body is read or parsed, and every route (including ones added later, such as the
streaming WebSocket) is covered without opting in.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from diffuser_api.api.errors import diffuser_error_handler
from diffuser_api.api.keys import ApiKey, KeyStore
from diffuser_api.api.playground import ASSETS_PATH as PLAYGROUND_ASSETS
from diffuser_api.api.playground import PAGE_PATH as PLAYGROUND_PAGE
from diffuser_api.api.request_record import record_of
from diffuser_api.config import Settings
from diffuser_api.errors import DiffuserError, RateLimited, Unauthorized, Unavailable

STATE_KEY = "api_key"
# Browsers cannot set headers on a WebSocket, so the key may come as a query parameter or as a
# subprotocol; the subprotocol prefix is the one OpenAI's Realtime API uses for the same reason.
QUERY_PARAMETER = "api_key"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


class PublicPaths:
    """What needs no key: /health, image files (their names are unguessable, like presigned
    URLs, so browsers can load ``url`` results), the playground page and its assets (they hold
    no secret, and the page must load to ask for a key), and /metrics if configured public.

    ``/health?model=ID`` is not public: a key limited to some models must not learn of the
    others by leaving its key out.
    """

    def __init__(self, settings: Settings) -> None:
        self._exact = {"/health", PLAYGROUND_PAGE} | ({"/metrics"} if settings.metrics_public else set())
        self._prefixes = (f"{settings.api_prefix}/images/files/", f"{PLAYGROUND_ASSETS}/")

    def covers(self, scope: Scope) -> bool:
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if path == "/health" and "model" in query:
            return False
        return path in self._exact or path.startswith(self._prefixes)


def presented_key(scope: Scope) -> str | None:
    """The key a client sent: ``Authorization: Bearer``, or on a WebSocket also the query or a
    subprotocol."""
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scope["type"] != "websocket":
        return None
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get(QUERY_PARAMETER):
        return query[QUERY_PARAMETER][0]
    for protocol in scope.get("subprotocols", []):
        if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            return protocol.removeprefix(KEY_SUBPROTOCOL_PREFIX)
    return None


def accepted_subprotocol(scope: Scope) -> str | None:
    """What a WebSocket route passes to ``accept(subprotocol=...)``: the first subprotocol the
    client offered that is not its key. Browsers drop a connection whose answer names none of
    theirs, and echoing the key back would put it in more logs."""
    for protocol in scope.get("subprotocols", []):
        if not protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
            return protocol
    return None


def api_key_of(connection: HTTPConnection) -> ApiKey | None:
    """The caller's key; None when keys are off or the path is public."""
    return connection.scope.get("state", {}).get(STATE_KEY)


async def refuse(scope: Scope, receive: Receive, send: Send, error: DiffuserError) -> None:
    """Answer with the error envelope before any route runs.

    A WebSocket gets the same HTTP answer where the server can send one during the handshake
    (the ``websocket.http.response`` extension, which uvicorn has); otherwise it is closed with
    1008 (policy violation) and the error code as the reason.
    """
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": error.code or "refused"})
        return
    response = await diffuser_error_handler(HTTPConnection(scope), error)
    await response(scope, receive, send)


class FailedKeyChecks(Protocol):
    """Counts failed key checks per client address (``RateLimiter`` does, in its store)."""

    async def refuse_if_too_many_auth_failures(self, connection: HTTPConnection) -> None: ...

    async def count_auth_failure(self, connection: HTTPConnection) -> None: ...


class ApiKeyMiddleware:
    """A client address that fails too many key checks gets 429 until its window frees up, even
    with a right key then: otherwise keys could be guessed without bound, and a 200 would tell
    the guesser which guess was right."""

    def __init__(self, app: ASGIApp, keys: KeyStore, public: PublicPaths, failures: FailedKeyChecks) -> None:
        self.app = app
        self._keys = keys
        self._public = public
        self._failures = failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self._keys.enabled or self._public.covers(scope):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        try:
            await self._failures.refuse_if_too_many_auth_failures(connection)
        except (RateLimited, Unavailable) as error:
            await refuse(scope, receive, send, error)
            return
        presented = presented_key(scope)
        key = self._keys.find(presented) if presented else None
        if key is None:
            message = (
                "Incorrect API key provided." if presented else
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
            await self._failures.count_auth_failure(connection)
            await refuse(scope, receive, send, Unauthorized(message))
            return
        scope["state"][STATE_KEY] = key
        record_of(connection).key_name = key.name
        await self.app(scope, receive, send)
