"""The async-job objects the job routes answer with, for the OpenAPI document (see responses.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from diffuser_api.api.responses import ErrorDetail, ImagesResponse

JobStatusName = Literal["queued", "in_progress", "completed", "failed", "cancelled", "expired"]


class ImageJobObject(BaseModel):
    """An async job: poll it, follow its events, cancel or delete it."""

    id: str = Field(description="imgjob_…")
    object: Literal["image.job"]
    status: JobStatusName
    endpoint: Literal["generations", "edits", "variations"]
    model: str
    created_at: int
    started_at: int | None = Field(description="When its latest attempt started.")
    completed_at: int | None
    expires_at: int | None = Field(description="When it and its images are deleted (410 after), once finished.")
    progress: int = Field(ge=0, le=100)
    queue_position: int | None = Field(description="Queued jobs of the same model ahead of this one.")
    attempts: int = Field(description="Runs started so far (a crash or failure starts another).")
    result: ImagesResponse | None = Field(description="The images response once completed.")
    error: ErrorDetail | None = Field(description="Why it failed or was cancelled.")


class ImageJobList(BaseModel):
    """The caller's jobs, newest first (OpenAI's list shape)."""

    object: Literal["list"]
    data: list[ImageJobObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ImageJobDeleted(BaseModel):
    id: str
    object: Literal["image.job.deleted"]
    deleted: bool
