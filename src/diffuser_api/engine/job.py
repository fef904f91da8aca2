"""A queued request: the work, its reply channel and its cancel flag."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from PIL.Image import Image

from diffuser_api.domain import EncodedPreview, GeneratedImage, ImageJob, StepProgress
from diffuser_api.domain.timeline import Phase
from diffuser_api.engine.priority import Priority

ProgressSink = Callable[[StepProgress], None]


@dataclass(frozen=True)
class WorkerEncoders:
    """What a job's worker encodes itself: each preview on its own thread right after the step
    that made it, and the final images right after the pipeline call, before its next batch (the
    batch's images at once, on one thread per core of its share: see ``Worker._deliver``).

    Where the pipeline's own threads hold every core (a CPU device), those are the cheap
    moments: encoded on another thread while the pipeline runs, the work preempts one of its
    threads and stalls the others at their next barrier (on 2 cores a millisecond of encoding
    cost the pipeline about two). The caller chooses: on a GPU the host cores are free anyway.
    Without a ``preview`` encoder, previews are reported as images (for a caller that encodes
    only those somebody watches).
    """

    result: Callable[[GeneratedImage], bytes]
    preview: Callable[[Image], EncodedPreview] | None = None


@dataclass
class JobTiming:
    """How long one job waited in the queue and computed, for its request's log line, and when
    (as phases on the wall clock), for its trace."""

    queue_wait_s: float | None = None
    compute_s: float | None = None
    phases: tuple[Phase, ...] = ()

    def record(self, jobs: Sequence[Job], now: float) -> None:
        """``jobs`` are one request's chunks: it waited until the first of them started."""
        offset_ns = time.time_ns() - time.monotonic_ns()

        def wall_ns(monotonic_s: float) -> int:
            return offset_ns + round(monotonic_s * 1e9)

        enqueued_at = min(job.enqueued_at for job in jobs)
        starts = [job.started_at for job in jobs if job.started_at is not None]
        if not starts:  # never left the queue (timeout, cancel, shutdown)
            self.queue_wait_s = now - enqueued_at
            self.phases = (Phase("queue wait", wall_ns(enqueued_at), wall_ns(now)),)
            return
        started_at = min(starts)
        self.queue_wait_s = started_at - enqueued_at
        self.compute_s = now - started_at
        self.phases = (
            Phase("queue wait", wall_ns(enqueued_at), wall_ns(started_at)),
            # The pipeline calls of the request's batches: text encoding, denoising, VAE decode.
            Phase("denoising", wall_ns(started_at), wall_ns(now)),
        )


@dataclass(eq=False)
class Job:
    """Crosses from the event loop to a worker thread and back through ``future``.

    The worker never touches the future directly: results and errors are handed to the
    loop with ``call_soon_threadsafe``. ``work`` is one chunk of the request's ``whole`` work
    (the same object when the request fits one batch); ``key`` says which jobs may share a
    pipeline call, computed once on submit so no model code runs under the queue's lock.
    ``priority`` and ``enqueued_at`` are the request's, shared by its chunks, so they age together.
    """

    work: ImageJob
    whole: ImageJob
    key: Hashable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[GeneratedImage]]
    progress: ProgressSink | None = None
    encoders: WorkerEncoders | None = None
    priority: Priority = Priority.INTERACTIVE
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    # Shared by one request's jobs: once one is cancelled or fails, no worker starts the others
    # and running ones stop at the next step (the request can no longer succeed).
    cancel_flag: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_flag.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_flag.is_set()

    def report_progress(self, progress: StepProgress) -> None:
        if self.progress is not None and not self.cancelled:
            self._post(self.progress, progress)

    def resolve(self, images: list[GeneratedImage]) -> None:
        self._post(_set_result, self.future, images)

    def fail(self, error: BaseException) -> None:
        self.cancel()
        self._post(_set_exception, self.future, error)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the event loop has closed (shutdown past its grace): nobody is waiting


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
