"""How a failed attempt ends a job: failed now, tried again, or given back to the queue."""

from __future__ import annotations

from enum import Enum

from diffuser_api.errors import (
    Cancelled,
    Conflict,
    DiffuserError,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    NotSupported,
    Overloaded,
    PayloadTooLarge,
)

# The same request would fail the same way on every attempt.
DETERMINISTIC = (InvalidRequest, NotSupported, ModelNotFound, PayloadTooLarge, Forbidden, Conflict)


class AfterFailure(Enum):
    FAIL = "fail"
    RETRY = "retry"  # the attempt counts
    REQUEUE = "requeue"  # not the job's fault: the attempt is given back


def after_failure(error: BaseException, attempts: int, max_attempts: int, shutting_down: bool) -> AfterFailure:
    if shutting_down or isinstance(error, Overloaded):
        return AfterFailure.REQUEUE
    if isinstance(error, DETERMINISTIC) or attempts >= max_attempts:
        return AfterFailure.FAIL
    return AfterFailure.RETRY


def error_of(error: BaseException) -> dict[str, str | None]:
    """The failure as stored; the API renders it as the OpenAI error object by its class."""
    if isinstance(error, DiffuserError):
        return {"class": type(error).__name__, "message": error.message, "param": error.param, "code": error.code}
    return {"class": "ModelFailure", "message": "The server had an error while running this job.", "param": None,
            "code": None}


def cancelled_error() -> dict[str, str | None]:
    return error_of(Cancelled("the job was cancelled", code="cancelled"))
