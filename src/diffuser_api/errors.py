"""The one family of failures every layer raises; ``api/errors.py`` maps each to HTTP.

Core code never knows status codes: it says *what* went wrong, and the API table decides
how the OpenAI envelope reports it.
"""

from __future__ import annotations


class DiffuserError(Exception):
    """Base of every failure a client may be told about."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(DiffuserError):
    """The client sent something we will not run: a bad value, or a parameter the model cannot use."""


class NotSupported(DiffuserError):
    """The loaded model cannot do the *task* asked for (generation, edit, masked edit, ...)."""


class Forbidden(DiffuserError):
    """A request the server will not take from where it came, such as a WebSocket opened by a page
    of another origin; unlike ``Unauthorized``, no key would change the answer."""


class ModelNotFound(DiffuserError):
    """No served model answers to the requested name."""


class NotFound(DiffuserError):
    """A stored object (e.g. an image file) does not exist."""


class Gone(DiffuserError):
    """A stored object existed but has expired (a finished job past its time to live)."""


class Conflict(DiffuserError):
    """The request contradicts the object's state (cancelling a finished job); retrying cannot help."""


class PayloadTooLarge(DiffuserError):
    """A request body is over its route's cap, or an image part over ``max_upload_bytes``."""


class Overloaded(DiffuserError):
    """The queue is full; the client should come back after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after


class Unauthorized(DiffuserError):
    """No API key, or one that matches no configured key; the message never repeats the key."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class RateLimited(DiffuserError):
    """The caller used up a requests or images limit; ``retry_after`` says when it frees up."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after


class Unavailable(DiffuserError):
    """The model is still loading, failed to load, or the server is shutting down."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerBusy(DiffuserError):
    """The server already serves ``max_connections`` requests and sessions; come back after ``retry_after``."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, code="server_busy")
        self.retry_after = retry_after


class BodyTimeout(DiffuserError):
    """The request body made no progress for ``body_timeout_s``: a stalled or deliberately slow client."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="body_timeout")


class ModelFailure(DiffuserError):
    """The pipeline raised while running a batch; the worker carries on with the next one."""


class OutOfMemory(ModelFailure):
    """The device ran out of memory; the engine retries the batch in smaller pieces."""


class RequestTimeout(DiffuserError):
    """The request ran past ``request_timeout_s``; retrying it would only repeat the wait."""


class Cancelled(DiffuserError):
    """Every client waiting on a batch has gone, so the work was abandoned."""
