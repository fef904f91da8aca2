"""A job as stored: what the store returns and the API shapes into the job object."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# Statuses a job never leaves (but for expiry): they get completed_at and expires_at.
FINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
PENDING = frozenset({JobStatus.QUEUED, JobStatus.IN_PROGRESS})
# Claimed in this order: async jobs before batch lines (the lowest class).
ASYNC_JOB_CLASS = 0
BATCH_LINE_CLASS = 1


def column_values(record: Any) -> dict[str, Any]:
    """A stored record's fields as a row, as they are: ``dataclasses.asdict`` deep-copies every
    request dict, which cost more than the insert itself for a batch's thousands of lines."""
    return {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}


def new_job_id() -> str:
    return f"imgjob_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``. ``result`` holds the stored images' names (see ``JobResult``),
    ``error`` the failure's class name, message, param and code; the API renders both."""

    id: str
    owner: str
    endpoint: str
    model: str
    request: dict[str, Any]
    status: JobStatus
    created_at: float
    request_id: str = ""
    idempotency_key: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    attempts: int = 0
    step: int | None = None
    total_steps: int | None = None
    image_index: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    # Set on the lines of a batch (see jobs/batches.py); None for an async job.
    batch_id: str | None = None
    custom_id: str | None = None
    line: int | None = None
    job_class: int = 0
    # The rate-limit identity a batch line is charged to as it runs (None: nothing to charge
    # here, an async job was charged at submission); a line refused for its caller's window
    # waits in the queue until ``not_before``.
    charge_to: str | None = None
    not_before: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    @property
    def progress(self) -> int:
        """0-100: the share of denoising steps done (100 once completed)."""
        if self.status is JobStatus.COMPLETED:
            return 100
        if not self.step or not self.total_steps:
            return 0
        return min(99, 100 * self.step // self.total_steps)

    @property
    def image_names(self) -> list[str]:
        return [image["name"] for image in (self.result or {}).get("images", [])]
