"""``max_connections``: how many requests and WebSocket sessions are served at once.

Each one holds memory (its body, its images) and a place in the event loop; past the limit a
client is told 503 with Retry-After at once, in the OpenAI envelope, instead of piling up.
Requests in flight are counted, not idle keep-alive connections, which cost a socket and
nothing else (uvicorn closes them after a few seconds). /health and /metrics are not counted
and never refused, so probes and scrapes still answer when the server is busiest; they read
figures and take no body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from diffuser_api.api.auth import refuse
from diffuser_api.errors import ServerBusy

EXEMPT_PATHS = frozenset({"/health", "/metrics"})
# A place frees up as soon as one request ends; a second is a fair first wait.
RETRY_AFTER_S = 1.0


class ConnectionLimitMiddleware:
    def __init__(self, app: ASGIApp, max_connections: int) -> None:
        self.app = app
        self._max = max_connections
        self._open = 0  # one event loop runs every request, so a plain count needs no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self._open >= self._max:
            message = f"The server is serving its limit of {self._max} requests at once; retry shortly."
            await refuse(scope, receive, send, ServerBusy(message, retry_after=RETRY_AFTER_S))
            return
        self._open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._open -= 1
