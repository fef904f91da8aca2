"""What one request did, filled in as it passes each layer; its log line and metrics read it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from diffuser_api.domain import ImageRequest, ImagesResult
from diffuser_api.domain.timeline import Timeline
from diffuser_api.engine.job import JobTiming
from diffuser_api.log_format import escape_control_characters
from diffuser_api.service.streaming import ImageStream, StreamEvent

STATE_KEY = "record"


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    status: int = 0
    duration_s: float = 0.0
    key_name: str | None = None
    model: str | None = None
    task: str | None = None
    size: str | None = None
    steps: int | None = None
    images: int | None = None
    queue_wait_s: float | None = None
    compute_s: float | None = None
    error_type: str | None = None  # the exception a failed request ended with
    # Its phases for the trace; the log line has their durations above.
    timeline: Timeline = field(default_factory=Timeline, repr=False)

    def __post_init__(self) -> None:
        # The client chose these: a "%0a" in a path is a newline here, which would start a
        # forged line in the text log and in any viewer that shows the JSON field as it is.
        self.method = escape_control_characters(self.method)
        self.path = escape_control_characters(self.path)

    def fields(self) -> dict[str, Any]:
        """The set fields but the timeline, for JSON logs."""
        return {
            item.name: value for item in dataclasses.fields(self)
            if item.name != "timeline" and (value := getattr(self, item.name)) is not None
        }

    def line(self) -> str:
        """One greppable text line: the request first, then what is known about its work."""
        head = f"{self.request_id} {self.method} {self.path} {self.status} {self.duration_s:.3f}s"
        details = [
            ("key", self.key_name), ("model", self.model), ("task", self.task), ("size", self.size),
            ("steps", self.steps), ("images", self.images),
            ("queue_wait", _seconds(self.queue_wait_s)), ("compute", _seconds(self.compute_s)),
        ]
        return " ".join([head, *(f"{name}={value}" for name, value in details if value is not None)])


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}s"


def record_of(connection: HTTPConnection) -> RequestRecord:
    """The record ``RequestIdMiddleware`` made for this request."""
    return connection.scope["state"][STATE_KEY]


@contextlib.contextmanager
def recording(connection: HTTPConnection, request: ImageRequest, timing: JobTiming) -> Iterator[RequestRecord]:
    """Notes the image request now and its timing at the end, however the request ends."""
    record = record_of(connection)
    record.task, record.images = request.endpoint.value, request.n
    try:
        yield record
    finally:
        _note_timing(record, timing)


def note_result(record: RequestRecord, result: ImagesResult, model_id: str) -> None:
    record.model, record.size, record.steps = model_id, result.size, result.steps


def note_stream(record: RequestRecord, stream: ImageStream) -> None:
    record.model, record.steps = stream.model_id, stream.job.steps
    record.size = f"{stream.job.width}x{stream.job.height}"


async def timed_events(
    record: RequestRecord, timing: JobTiming, events: AsyncIterator[StreamEvent]
) -> AsyncIterator[StreamEvent]:
    """A stream outlives its handler: its timing is known only once the stream ends."""
    try:
        async for event in events:
            yield event
    except Exception as error:  # the client gets it as an error event, after a 200
        record.error_type = type(error).__name__
        raise
    finally:
        _note_timing(record, timing)


def _note_timing(record: RequestRecord, timing: JobTiming) -> None:
    """A stream's job has not run when its handler returns: its timing is still empty then, and is
    noted again as the stream ends."""
    record.queue_wait_s, record.compute_s = timing.queue_wait_s, timing.compute_s
    record.timeline.add(*timing.phases)
