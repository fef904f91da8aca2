"""Streamed requests: the engine's step reports become events, then one event per image.

The API turns these events into OpenAI's SSE framing or WebSocket messages; this module
knows neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from PIL.Image import Image

from diffuser_api.domain import EncodedPreview, GeneratedImage, ImageJob, StepProgress, StoredImage
from diffuser_api.engine.backend import ModelBackend
from diffuser_api.engine.job import JobTiming, WorkerEncoders
from diffuser_api.engine.updates import QueuePosition, job_updates
from diffuser_api.models.registry import ModelRegistry, ServedModel


@dataclass(frozen=True)
class Loading:
    """The model is being loaded for this request (once, before any other event)."""


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Step:
    step: int
    total: int


@dataclass(frozen=True)
class PartialImage:
    image_index: int
    partial_image_index: int
    b64_json: str


@dataclass(frozen=True)
class Completed:
    image_index: int
    image: StoredImage
    prompt_tokens: int | None


StreamEvent = Loading | Queued | Step | PartialImage | Completed


@dataclass(frozen=True)
class ImageStream:
    """A checked request whose events have not started yet: errors so far were plain HTTP."""

    job: ImageJob
    model_id: str
    events: AsyncIterator[StreamEvent]


async def leased_job_events(
    registry: ModelRegistry,
    model: ServedModel,
    job: ImageJob,
    encode_preview: Callable[[Image], Awaitable[str]],
    store: Callable[[GeneratedImage], Awaitable[StoredImage]],
    timing: JobTiming | None = None,
    encoders: WorkerEncoders | None = None,
) -> AsyncIterator[StreamEvent]:
    """``job_events`` under a lease on the model, taken when the stream starts: a model that
    has to load first says so with one ``Loading`` event, then the wait goes on (the request's
    deadline covers the load and the queue)."""
    deadline = time.monotonic() + model.spec.engine.request_timeout_s
    loading = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        leasing = asyncio.ensure_future(
            stack.enter_async_context(registry.lease(model, deadline=deadline, on_loading=loading.set))
        )
        try:
            waiting_for_load = asyncio.ensure_future(loading.wait())
            await asyncio.wait({leasing, waiting_for_load}, return_when=asyncio.FIRST_COMPLETED)
            waiting_for_load.cancel()
            if loading.is_set():
                yield Loading()
            engine = await leasing
        finally:
            if not leasing.done():
                leasing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await leasing
        async for event in job_events(engine, job, encode_preview, store, timing, deadline, encoders):
            yield event


async def job_events(
    engine: ModelBackend,
    job: ImageJob,
    encode_preview: Callable[[Image], Awaitable[str]],
    store: Callable[[GeneratedImage], Awaitable[StoredImage]],
    timing: JobTiming | None = None,
    deadline: float | None = None,
    encoders: WorkerEncoders | None = None,
) -> AsyncIterator[StreamEvent]:
    """Run the job, yielding its progress; closing the iterator early cancels the job.
    Previews and images are encoded by ``encoders`` on the model's worker where given (see
    ``WorkerEncoders``), else by ``encode_preview`` and ``store`` here."""
    partial_counts = [0] * job.n
    updates = job_updates(engine, job, timing, deadline, encoders=encoders)
    try:
        async for update in updates:
            if isinstance(update, QueuePosition):
                yield Queued(update.position)
            elif isinstance(update, StepProgress):
                async for event in _step_events(update, partial_counts, encode_preview):
                    yield event
            else:
                for index, image in enumerate(update.images):
                    yield Completed(index, await store(image), image.prompt_tokens)
    finally:
        await updates.aclose()


async def _step_events(
    progress: StepProgress, partial_counts: list[int], encode_preview: Callable[[Image], Awaitable[str]]
) -> AsyncIterator[StreamEvent]:
    yield Step(progress.step, progress.total)
    # A request run as several batches reports each batch's previews from its first image on.
    for index, preview in enumerate(progress.previews or (), start=progress.first_image):
        encoded = preview.b64_json if isinstance(preview, EncodedPreview) else await encode_preview(preview)
        yield PartialImage(index, partial_counts[index], encoded)
        partial_counts[index] += 1
