"""Signed webhook POSTs when async jobs (and batches) end, delivered in the background.

The receiver is configured on the server (``DIFFUSER_JOB_WEBHOOK_URL``), never taken from a
request: a URL from a client would let anyone make the server POST into its own network.

Messages follow Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id`` names the
message and stays the same on every retry (receivers drop duplicates by it),
``webhook-timestamp`` is the attempt's time in seconds, and ``webhook-signature`` is
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` under the secret's key. Receivers
refuse old timestamps, so every attempt is signed afresh; the body never changes.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from diffuser_api.config.settings import Settings, webhook_signing_key

logger = logging.getLogger(__name__)

# Deliveries still trying when the server stops get this long to finish; then they are given up
# (a shutdown must not wait through a receiver's back-off).
CLOSE_GRACE_S = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a message again: exponential back-off with jitter, or the receiver's word."""

    max_attempts: int
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    # A receiver's Retry-After is followed up to this; one asking for more is asked again then.
    max_retry_after_s: float = 600.0

    def delay_before(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait before try ``attempt`` (2, 3, ...).

        Without Retry-After the delay doubles each time, half of it fixed and half random, so
        the messages of many jobs that failed together do not all come back at once."""
        if retry_after_s is not None:
            return min(retry_after_s, self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 2))
        return ceiling / 2 + random.uniform(0.0, ceiling / 2)


@dataclass(frozen=True)
class WebhookMessage:
    id: str
    event_type: str
    subject: str | None  # the job's (or batch's) id, for the log lines
    body: str


def retry_after_s(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retryable(status_code: int) -> bool:
    """The receiver is overloaded or broken for now; any other refusal would be refused again."""
    return status_code == 429 or status_code >= 500


class WebhookSender:
    """Sends each message in a task of its own on the event loop, with retries."""

    def __init__(
        self,
        url: str,
        signing_key: bytes,
        policy: RetryPolicy,
        timeout_s: float,
        close_grace_s: float = CLOSE_GRACE_S,
    ) -> None:
        self._url = url
        # Logs name the receiver by host: a URL may carry a token in its path or query.
        self._receiver = urlsplit(url).hostname or "?"
        self._key = signing_key
        self._policy = policy
        self._close_grace_s = close_grace_s
        # Redirects are not followed: the signed POST goes to the configured URL or nowhere.
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSender | None:
        """None when no webhook is configured (settings refuse a URL without a secret)."""
        if settings.job_webhook_url is None or settings.job_webhook_secret is None:
            return None
        return cls(
            settings.job_webhook_url,
            webhook_signing_key(settings.job_webhook_secret.get_secret_value()),
            RetryPolicy(settings.job_webhook_max_attempts),
            settings.job_webhook_timeout_s,
        )

    def send(self, event_type: str, data: dict[str, Any]) -> None:
        """Schedule ``{"type", "timestamp", "data"}`` for delivery and return at once; call on the
        event loop. Failures are logged, never raised: a job's outcome does not depend on its
        webhook."""
        subject = data.get("id")
        if self._closed:
            logger.warning("webhook %s for %s not sent: the server is stopping", event_type, subject)
            return
        payload = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": data}
        try:
            body = json.dumps(payload, separators=(",", ":"))
        except (TypeError, ValueError) as error:
            logger.error("webhook %s for %s not sent: its data is not JSON (%s)", event_type, subject, error)
            return
        message = WebhookMessage(f"msg_{uuid.uuid4().hex}", event_type, str(subject) if subject else None, body)
        task = asyncio.get_running_loop().create_task(self._deliver(message))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def close(self) -> None:
        """Refuse new messages, give those in flight ``close_grace_s`` to finish, then drop them."""
        self._closed = True
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=self._close_grace_s)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("%d webhook message(s) given up at shutdown", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()

    async def _deliver(self, message: WebhookMessage) -> None:
        attempts = self._policy.max_attempts
        for attempt in range(1, attempts + 1):
            retry, wait_hint = await self._attempt(message, attempt)
            if not retry:
                return
            if attempt < attempts:
                await asyncio.sleep(self._policy.delay_before(attempt + 1, wait_hint))
        logger.error(
            "webhook %s for %s (%s) to %s given up after %d attempts",
            message.event_type, message.subject, message.id, self._receiver, attempts,
        )

    async def _attempt(self, message: WebhookMessage, attempt: int) -> tuple[bool, float | None]:
        """One POST: (whether to try again, the receiver's Retry-After)."""
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "webhook-id": message.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": self._signature(message.id, timestamp, message.body),
        }
        try:
            response = await self._client.post(self._url, content=message.body.encode(), headers=headers)
        except httpx.TransportError as error:  # connection refused or reset, timeouts
            self._log_failure(message, attempt, type(error).__name__, logging.WARNING)
            return True, None
        if response.is_success:
            logger.info("webhook %s for %s (%s) delivered to %s", message.event_type, message.subject,
                        message.id, self._receiver)
            return False, None
        if _retryable(response.status_code):
            self._log_failure(message, attempt, f"HTTP {response.status_code}", logging.WARNING)
            return True, retry_after_s(response)
        self._log_failure(message, attempt, f"HTTP {response.status_code}, not retried", logging.ERROR)
        return False, None

    def _signature(self, message_id: str, timestamp: str, body: str) -> str:
        digest = hmac.new(self._key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
        return f"v1,{base64.b64encode(digest).decode()}"

    def _log_failure(self, message: WebhookMessage, attempt: int, reason: str, level: int) -> None:
        logger.log(
            level, "webhook %s for %s (%s) to %s: attempt %d of %d failed: %s",
            message.event_type, message.subject, message.id, self._receiver, attempt, self._policy.max_attempts,
            reason,
        )
