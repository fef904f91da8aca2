"""Requests and images per minute (or any window), per API key, or per client address when
keys are off. Counting is the ``limits`` library's: in memory for one process, Redis for
several replicas sharing one budget.

Every limited response, 429 or not, carries OpenAI's ``x-ratelimit-*`` headers, so clients can
slow down before they are refused.
"""

from __future__ import annotations

import math
import time
from typing import Any

import limits
from limits.aio.strategies import STRATEGIES
from limits.storage import storage_from_string
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuser_api.api.auth import PublicPaths, api_key_of, refuse
from diffuser_api.config import Settings
from diffuser_api.errors import InvalidRequest, RateLimited

HEADERS_STATE_KEY = "rate_limit_headers"
REQUESTS, IMAGES = "requests", "images"


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        uri = settings.rate_limit_storage_uri
        storage = storage_from_string(uri if uri.startswith("async+") else f"async+{uri}")
        self._strategy = STRATEGIES[settings.rate_limit_strategy](storage)
        self._defaults = {REQUESTS: settings.rate_limit_requests, IMAGES: settings.rate_limit_images}
        self._trusted_proxies = set(settings.trusted_proxies)

    def limits_for(self, connection: HTTPConnection) -> dict[str, str | None]:
        """The key's own limits where it has them, else the defaults."""
        key = api_key_of(connection)
        own = {REQUESTS: key.requests_limit, IMAGES: key.images_limit} if key else {}
        return {kind: own.get(kind) or default for kind, default in self._defaults.items()}

    async def admit(self, connection: HTTPConnection, kind: str, cost: int = 1) -> None:
        """Count ``cost`` against the caller's ``kind`` limit; 429 when it does not fit.

        The headers for the response are left in the request state either way.
        """
        text = self.limits_for(connection)[kind]
        if text is None:
            return
        item = limits.parse(text)
        if cost > item.amount:
            raise InvalidRequest(
                f"this request asks for {cost} {kind} but the limit is {text}; ask for at most {item.amount}",
                param="n", code="rate_limit_exceeded",
            )
        identity = self._identity(connection)
        allowed = await self._strategy.hit(item, kind, identity, cost=cost)
        stats = await self._strategy.get_window_stats(item, kind, identity)
        reset_s = max(0.0, stats.reset_time - time.time())
        connection.scope["state"].setdefault(HEADERS_STATE_KEY, {}).update({
            f"x-ratelimit-limit-{kind}": str(item.amount),
            f"x-ratelimit-remaining-{kind}": str(stats.remaining),
            f"x-ratelimit-reset-{kind}": openai_duration(reset_s),
        })
        if not allowed:
            raise RateLimited(
                f"Rate limit reached for {kind}: {text}. Try again in {openai_duration(reset_s)}.",
                retry_after=max(1, math.ceil(reset_s)),
            )

    def _identity(self, connection: HTTPConnection) -> str:
        key = api_key_of(connection)
        if key is not None:
            return f"key:{key.name}"
        address = connection.client.host if connection.client else "unknown"
        if address in self._trusted_proxies:
            forwarded = connection.headers.get("x-forwarded-for", "").split(",")[0].strip()
            address = forwarded or address
        return f"address:{address}"


def openai_duration(seconds: float) -> str:
    """OpenAI writes resets as ``17ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


async def admit_images(connection: HTTPConnection, count: int) -> None:
    """Called by image routes once they know ``n``."""
    limiter: RateLimiter = connection.app.state.rate_limiter
    await limiter.admit(connection, IMAGES, count)


def describe_limits(connection: HTTPConnection) -> dict[str, Any]:
    """The caller's key name and limits, for ``/``."""
    key = api_key_of(connection)
    limiter: RateLimiter = connection.app.state.rate_limiter
    return {"api_key": key.name if key else None, "rate_limits": limiter.limits_for(connection)}


class RateLimitMiddleware:
    """Counts every request on a non-public path and adds the headers to its response."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, public: PublicPaths) -> None:
        self.app = app
        self._limiter = limiter
        self._public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        async def send_with_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                extra = scope["state"].get(HEADERS_STATE_KEY, {})
                message["headers"] = [
                    *message.get("headers", []), *((name.encode(), value.encode()) for name, value in extra.items())
                ]
            await send(message)

        try:
            await self._limiter.admit(HTTPConnection(scope), REQUESTS)
        except (RateLimited, InvalidRequest) as error:
            await refuse(scope, receive, send_with_headers, error)
            return
        await self.app(scope, receive, send_with_headers)
