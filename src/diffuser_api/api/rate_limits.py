"""Requests and images per minute (or any window), per API key, or per client address when
keys are off; failed key checks per client address. Counting is the ``limits`` library's: in
memory for one process, Redis for several replicas sharing one budget.

Every limited response, 429 or not, carries OpenAI's ``x-ratelimit-*`` headers, so clients can
slow down before they are refused.

The store is a network service that can fail or hang, and a rate limiter must never be why the
server stops answering: each call to it is bounded by ``rate_limit_store_timeout_s``, and a
failed one is handled as ``rate_limit_on_store_error`` says (serve, or a 503 to retry), never
a 500. Building the limiter connects to nothing, so the server starts with the store down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import limits
from limits.aio.strategies import STRATEGIES
from limits.errors import StorageError
from limits.limits import RateLimitItem
from limits.storage import storage_from_string
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuser_api.api.auth import PublicPaths, api_key_of, refuse
from diffuser_api.api.keys import KeyStore
from diffuser_api.api.proxies import ProxyRule
from diffuser_api.config import Settings
from diffuser_api.engine.job import JobTiming
from diffuser_api.errors import (
    Cancelled,
    InvalidRequest,
    Overloaded,
    RateLimited,
    RequestTimeout,
    Unavailable,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
HEADERS_STATE_KEY = "rate_limit_headers"
REQUESTS, IMAGES, AUTH_FAILURES = "requests", "images", "auth-failures"
STORE_ERROR_LOG_INTERVAL_S = 60.0
STORE_RETRY_AFTER_S = 5.0
# After a failure the store is left alone this long, so that while it is down (or hangs)
# requests fail over at once instead of each waiting out the timeout.
STORE_PAUSE_S = 1.0
# The shortest wait of a batch line refused for its caller's image limit.
MIN_CHARGE_WAIT_S = 0.5
KEY_IDENTITY = "key:"
# How a request that was charged images can end without its job ever running. Overloaded is
# raised before the job is queued; the others may also come after it ran, so the job's timing
# decides (see ImagesCharge).
NEVER_STARTED_ERRORS = (Overloaded, Unavailable, RequestTimeout, Cancelled, asyncio.CancelledError, GeneratorExit)


@dataclass(frozen=True)
class Charge:
    """What one admission counted, so it can be given back."""

    item: RateLimitItem
    kind: str
    identity: str
    cost: int
    counts_until: float  # wall-clock time when the charge stops counting against the window


@dataclass(frozen=True)
class Counted:
    """One hit on the store: whether it fit, and what the window says after it."""

    allowed: bool
    remaining: int
    reset_time: float
    counts_until: float


class StorePaused(Exception):
    """The store failed moments ago and is not asked again yet."""


class StoreErrors:
    """A failing store fails every request: log it once per interval, with how many were hit,
    rather than once per request; count each in the metric."""

    def __init__(self, count: Callable[[], None], interval_s: float = STORE_ERROR_LOG_INTERVAL_S) -> None:
        self._count = count
        self._interval_s = interval_s
        self._last_logged = -math.inf
        self._since_logged = 0

    def note(self, error: BaseException) -> None:
        self._count()
        self._since_logged += 1
        now = time.monotonic()
        if now - self._last_logged >= self._interval_s:
            logger.warning(
                "rate-limit store failed (%s); %d failures since the last report", type(error).__name__,
                self._since_logged,
            )
            self._last_logged, self._since_logged = now, 0


class RateLimiter:
    def __init__(
        self, settings: Settings, proxies: ProxyRule, on_store_error: Callable[[], None], keys: KeyStore | None = None
    ) -> None:
        """``keys`` gives the image limits of the keys batch lines are charged to."""
        uri = settings.rate_limit_storage_uri
        self._storage = storage_from_string(uri if uri.startswith("async+") else f"async+{uri}")
        self._strategy = STRATEGIES[settings.rate_limit_strategy](self._storage)
        # A fixed window's counts all end with the window; the other strategies count each hit
        # for (at least) one window from when it was made.
        self._charges_end_with_window = settings.rate_limit_strategy == "fixed-window"
        self._defaults = {REQUESTS: settings.rate_limit_requests, IMAGES: settings.rate_limit_images}
        self._auth_failures = limits.parse(settings.rate_limit_auth_failures)
        self._proxies = proxies
        self._keys = keys or KeyStore([])
        self._timeout_s = settings.rate_limit_store_timeout_s
        self._deny_on_store_error = settings.rate_limit_on_store_error == "deny"
        self._store_errors = StoreErrors(on_store_error)
        self._failures: tuple[type[BaseException], ...] = (
            StorePaused, StorageError, TimeoutError, OSError, *_as_tuple(self._storage.base_exceptions)
        )
        self._paused_until = -math.inf
        self._credit = RefundCredit(self._storage)

    def limits_for(self, connection: HTTPConnection) -> dict[str, str | None]:
        """The key's own limits where it has them, else the defaults."""
        key = api_key_of(connection)
        own = {REQUESTS: key.requests_limit, IMAGES: key.images_limit} if key else {}
        return {kind: own.get(kind) or default for kind, default in self._defaults.items()}

    async def admit(self, connection: HTTPConnection, kind: str, cost: int = 1) -> Charge | None:
        """Count ``cost`` against the caller's ``kind`` limit; 429 when it does not fit.

        Returns what was counted (None when nothing was: no limit, or the store failed and the
        policy serves anyway). The headers for the response are left in the request state.
        """
        text = self.limits_for(connection)[kind]
        if text is None:
            return None
        item = limits.parse(text)
        if cost > item.amount:
            raise InvalidRequest(
                f"this request asks for {cost} {kind} but the limit is {text}; ask for at most {item.amount}",
                param="n", code="rate_limit_exceeded",
            )
        identity = self.identity_of(connection)
        try:
            counted = await self._count(item, kind, identity, cost)
        except self._failures as error:
            self._store_failed(error)
            return None
        reset_s = max(0.0, counted.reset_time - time.time())
        connection.scope["state"].setdefault(HEADERS_STATE_KEY, {}).update({
            f"x-ratelimit-limit-{kind}": str(item.amount),
            f"x-ratelimit-remaining-{kind}": str(counted.remaining),
            f"x-ratelimit-reset-{kind}": openai_duration(reset_s),
        })
        if not counted.allowed:
            raise RateLimited(
                f"Rate limit reached for {kind}: {text}. Try again in {openai_duration(reset_s)}.",
                retry_after=max(1, math.ceil(reset_s)),
            )
        return Charge(item, kind, identity, cost, counted.counts_until)

    async def charge_images(self, identity: str, cost: int) -> float | None:
        """Count a batch line's images against ``identity``'s image limit as the line is about
        to run (the batch itself was not charged). None once counted (or with no limit);
        otherwise the seconds until the window has room: the line waits, it is not failed.

        A failed store is handled as for requests: ``allow`` runs the line, ``deny`` holds it
        back a few seconds."""
        text = self._images_limit_of(identity)
        if text is None:
            return None
        item = limits.parse(text)
        if cost > item.amount:
            raise InvalidRequest(
                f"this request asks for {cost} images but the limit is {text}; ask for at most {item.amount}",
                param="n", code="rate_limit_exceeded",
            )
        try:
            counted = await self._count(item, IMAGES, identity, cost)
        except self._failures as error:
            self._store_errors.note(error)
            return STORE_RETRY_AFTER_S if self._deny_on_store_error else None
        if counted.allowed:
            return None
        # A window that reopens "now" (clock edges) still waits a little, so a refused line is
        # never claimed again in a tight loop.
        return max(MIN_CHARGE_WAIT_S, counted.reset_time - time.time())

    def identity_of(self, connection: HTTPConnection) -> str:
        """Whose budget a request counts against: its key, or its client address without keys."""
        key = api_key_of(connection)
        if key is not None:
            return f"{KEY_IDENTITY}{key.name}"
        return f"address:{self._proxies.client_address(connection)}"

    def _images_limit_of(self, identity: str) -> str | None:
        """The image limit of an identity stored earlier (a batch's): its key's own limit,
        looked up now, else the default."""
        key = self._keys.named(identity.removeprefix(KEY_IDENTITY)) if identity.startswith(KEY_IDENTITY) else None
        return (key.images_limit if key is not None else None) or self._defaults[IMAGES]

    async def _count(self, item: RateLimitItem, kind: str, identity: str, cost: int) -> Counted:
        # Images given back by requests that never ran are spent first (see RefundCredit).
        credit_until = (
            await self._bounded(self._credit.take(item, kind, identity, cost)) if kind == IMAGES else None
        )
        hit_at = time.time()
        allowed = credit_until is not None or await self._bounded(self._strategy.hit(item, kind, identity, cost=cost))
        stats = await self._bounded(self._strategy.get_window_stats(item, kind, identity))
        credit = await self._bounded(self._credit.available(item, kind, identity)) if kind == IMAGES else 0
        if credit_until is not None:  # a refund of this can only go back to the credit it came from
            counts_until = credit_until
        elif self._charges_end_with_window:
            counts_until = stats.reset_time
        else:
            counts_until = hit_at + item.get_expiry()
        return Counted(allowed, stats.remaining + credit, stats.reset_time, counts_until)

    async def refund(self, connection: HTTPConnection, charge: Charge) -> None:
        """Give back what ``admit`` counted. The request has already failed with its own error, so a
        store failure here only loses the refund (logged and counted), whatever the policy."""
        try:
            given = await self._bounded(self._credit.give(charge))
        except self._failures as error:
            self._store_errors.note(error)
            return
        headers = connection.scope["state"].get(HEADERS_STATE_KEY, {})
        remaining = f"x-ratelimit-remaining-{charge.kind}"
        if given and remaining in headers:  # the error response has not started yet: let it say so
            headers[remaining] = str(int(headers[remaining]) + charge.cost)

    async def refuse_if_too_many_auth_failures(self, connection: HTTPConnection) -> None:
        """429 once the client's address has failed ``rate_limit_auth_failures`` key checks in the
        window, whatever key it sends now: a guesser cannot tell a right guess from a wrong one
        until the window frees up."""
        address = self._proxies.client_address(connection)
        item = self._auth_failures
        try:
            if await self._bounded(self._strategy.test(item, AUTH_FAILURES, address)):
                return
            stats = await self._bounded(self._strategy.get_window_stats(item, AUTH_FAILURES, address))
        except self._failures as error:
            self._store_failed(error)
            return
        reset_s = max(0.0, stats.reset_time - time.time())
        raise RateLimited(
            f"Too many failed API key checks from this address. Try again in {openai_duration(reset_s)}.",
            retry_after=max(1, math.ceil(reset_s)),
        )

    async def count_auth_failure(self, connection: HTTPConnection) -> None:
        """The 401 is the answer whatever happens here: a store failure is only logged and counted."""
        address = self._proxies.client_address(connection)
        try:
            await self._bounded(self._strategy.hit(self._auth_failures, AUTH_FAILURES, address))
        except self._failures as error:
            self._store_errors.note(error)

    async def _bounded(self, call: Coroutine[Any, Any, T]) -> T:
        """A store that accepts connections and never answers must not hold requests."""
        if time.monotonic() < self._paused_until:
            call.close()
            raise StorePaused
        try:
            return await asyncio.wait_for(call, self._timeout_s)
        except self._failures:
            self._paused_until = time.monotonic() + STORE_PAUSE_S
            raise

    def _store_failed(self, error: BaseException) -> None:
        self._store_errors.note(error)
        if self._deny_on_store_error:
            raise Unavailable(
                "Rate limits cannot be checked right now, so this request was not run; retry shortly.",
                retry_after=STORE_RETRY_AFTER_S,
            ) from None


class RefundCredit:
    """Refunds as a credit the caller's next images spend before the limit counts them.

    None of the ``limits`` strategies can take back a hit (a moving window keeps one timestamp
    per unit, with no way to remove one), so a refund is kept in a counter of its own, made
    with the storage's ``incr``, which every store has: it works the same for all three
    strategies. The credit lasts only as long as the refunded charge would still have counted
    (to the end of a fixed window; one window from the hit otherwise), so it never lets a
    caller run more than its limit: it can only give back less, when refunds arrive out of
    order (then the later-expiring one is dropped) or when the store fails.
    """

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    async def available(self, item: RateLimitItem, kind: str, identity: str) -> int:
        return int(await self._storage.get(_credit_key(item, kind, identity)))

    async def take(self, item: RateLimitItem, kind: str, identity: str, cost: int) -> float | None:
        """Spend ``cost`` of the credit; returns when the credit expires, or None if too little is left."""
        key = _credit_key(item, kind, identity)
        if await self._storage.get(key) < cost:
            return None
        left = await self._storage.incr(key, item.get_expiry(), amount=-cost)
        if left < 0:  # another request took it first: put back what this one overdrew
            await self._storage.incr(key, item.get_expiry(), amount=cost)
            return None
        return float(await self._storage.get_expiry(key))

    async def give(self, charge: Charge) -> bool:
        """Returns whether the credit was given."""
        seconds_left = math.floor(charge.counts_until - time.time())
        if seconds_left < 1:
            return False  # the charge no longer counts (or is about to): nothing to give back
        key = _credit_key(charge.item, charge.kind, charge.identity)
        # A counter has one expiry, set when it is created; adding to one that outlives this
        # charge would let the credit count after the charge stopped counting.
        if await self._storage.get(key) > 0 and await self._storage.get_expiry(key) > charge.counts_until:
            return False
        await self._storage.incr(key, seconds_left, amount=charge.cost)
        return True


def _credit_key(item: RateLimitItem, kind: str, identity: str) -> str:
    return item.key_for("refund", kind, identity)


def _as_tuple(exceptions: type[BaseException] | tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    return exceptions if isinstance(exceptions, tuple) else (exceptions,)


class ImagesCharge:
    """The service's ``admit`` for one request: counts its images against the caller's budget,
    and gives them back if the request ends without its job having run (queue full, timed out
    or cancelled while still queued, client gone before it started)."""

    def __init__(self, connection: HTTPConnection, timing: JobTiming) -> None:
        self._connection = connection
        self._timing = timing
        self._charge: Charge | None = None

    async def __call__(self, count: int) -> None:
        limiter: RateLimiter = self._connection.app.state.rate_limiter
        self._charge = await limiter.admit(self._connection, IMAGES, count)

    @contextlib.asynccontextmanager
    async def refunded_if_never_run(self) -> AsyncIterator[None]:
        try:
            yield
        except NEVER_STARTED_ERRORS as error:
            await self._refund_if_never_run(error)
            raise

    async def refunded_events(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """The same for a stream, whose job runs only while its events are read."""
        async with self.refunded_if_never_run():
            async for event in events:
                yield event

    async def _refund_if_never_run(self, error: BaseException) -> None:
        # Only an overloaded queue refuses before the job is queued; otherwise only a timing
        # recorded with no compute proves the job never ran (a cancelled task may end before
        # the engine records it: then nothing is refunded).
        never_ran = isinstance(error, Overloaded) or (
            self._timing.queue_wait_s is not None and self._timing.compute_s is None
        )
        if self._charge is None or not never_ran:
            return
        charge, self._charge = self._charge, None
        limiter: RateLimiter = self._connection.app.state.rate_limiter
        # Shielded: a request being cancelled still gets its refund written.
        await asyncio.shield(limiter.refund(self._connection, charge))


def openai_duration(seconds: float) -> str:
    """OpenAI writes resets as ``17ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


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
        if scope["type"] not in ("http", "websocket") or self._public.covers(scope):
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
        except (RateLimited, InvalidRequest, Unavailable) as error:
            await refuse(scope, receive, send_with_headers, error)
            return
        await self.app(scope, receive, send_with_headers)
