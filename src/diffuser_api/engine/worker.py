"""One thread per model copy: takes batches, runs them, settles every job's future."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from PIL.Image import Image

from diffuser_api.domain import EncodedPreview, GeneratedImage, StepProgress
from diffuser_api.engine.batching import BatchLimits, JobQueue, QueueClosed
from diffuser_api.engine.job import Job
from diffuser_api.engine.runner import ModelRunner, PreviewSource
from diffuser_api.errors import Cancelled, DiffuserError, ModelFailure, OutOfMemory

logger = logging.getLogger(__name__)

USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def encoding_threads(workers: int) -> int:
    """A batch's images are encoded on this many threads at once (PIL releases the GIL while it
    encodes): between two pipeline calls a worker's cores are its own to use. ``workers`` share
    the cores (``DIFFUSER_DEVICE=cpu,cpu``): one may encode while another's call runs."""
    return max(1, USABLE_CORES // workers)


BatchObserver = Callable[["BatchReport"], None]


def preview_steps(partial_images: int, total: int) -> set[int]:
    """Steps, evenly spaced and before the last, after which a job gets a preview."""
    return {round(total * (index + 1) / (partial_images + 1)) for index in range(partial_images)} - {0, total}


def failure_caused_by(error: BaseException, message: str) -> ModelFailure:
    """One per job: each request raises its own, so tracebacks do not pile up on a shared one."""
    failure = ModelFailure(message)
    failure.__cause__ = error
    return failure


class _BatchAbandoned(Exception):
    """Raised from the step callback when no client of the batch is left."""


class BatchReport:
    """Figures about one finished pipeline call, for logs and metrics."""

    def __init__(self, worker: str, jobs: list[Job], compute_s: float, steps: int, outcome: str) -> None:
        self.worker = worker
        self.size = sum(job.work.n for job in jobs)
        self.queue_wait_s = [(job.started_at or 0.0) - job.enqueued_at for job in jobs]
        self.compute_s = compute_s
        self.steps = steps
        self.outcome = outcome

    @classmethod
    def of_figures(
        cls, worker: str, size: int, queue_wait_s: list[float], compute_s: float, steps: int, outcome: str
    ) -> BatchReport:
        """A report rebuilt from its figures, as a remote replica sends them (no jobs here)."""
        report = cls(worker, [], compute_s, steps, outcome)
        report.size = size
        report.queue_wait_s = list(queue_wait_s)
        return report


WorkerExit = Callable[["Worker"], None]
# The device's turn for a batch, held around its pipeline call (see device_turns).
DeviceTurn = Callable[[list[Job]], contextlib.AbstractContextManager[None]]


def no_turn(batch: list[Job]) -> contextlib.AbstractContextManager[None]:
    """A device of its own: nobody to take turns with."""
    return contextlib.nullcontext()


def _as_shown(job: Job, previews: list[Image]) -> tuple[Image | EncodedPreview, ...]:
    """Encoded here, between two steps, where the job brought encoders. One that fails leaves
    the image as it is (its reader encodes it then): a preview must never fail the batch."""
    encode = job.encoders.preview if job.encoders is not None else None
    if encode is None:
        return tuple(previews)
    shown: list[Image | EncodedPreview] = []
    for image in previews:
        try:
            shown.append(encode(image))
        except Exception:
            logger.exception("encoding a preview on the worker failed; its stream encodes it instead")
            shown.append(image)
    return tuple(shown)


def _delivered(job: Job, image: GeneratedImage) -> GeneratedImage:
    """Encoded with the job's encoder. One that fails leaves the image as it is: whoever
    stores it encodes it, and reports the failure."""
    assert job.encoders is not None
    try:
        return dataclasses.replace(image, encoded=job.encoders.result(image))
    except Exception:
        logger.exception("encoding an image on the worker failed; its request encodes it instead")
        return image


def _settled(image: GeneratedImage) -> Future[GeneratedImage]:
    done: Future[GeneratedImage] = Future()
    done.set_result(image)
    return done


class Worker:
    """Owns one runner. If its thread dies (an error escaping the loop, a ``BaseException`` from
    the pipeline), the jobs it held fail with a ``ModelFailure`` and ``on_death`` is told, so
    the engine can start a replacement: nothing it held hangs, nothing queued waits forever."""

    def __init__(
        self,
        runner: ModelRunner,
        queue: JobQueue,
        limits: BatchLimits,
        observe: BatchObserver | None = None,
        on_death: WorkerExit | None = None,
        turn: DeviceTurn = no_turn,
        encoding_threads: int = 1,
    ) -> None:
        self.runner = runner
        self._turn = turn
        self._queue = queue
        self._limits = limits
        self._lone_limits = dataclasses.replace(limits, wait_s=0.0)
        self._observe = observe
        self._on_death = on_death
        self._thread = threading.Thread(target=self._serve, name=f"worker-{runner.name}", daemon=True)
        self._held: list[Job] = []
        self._encoding_threads = encoding_threads
        self._encoding: ThreadPoolExecutor | None = None  # started by the first job that brings encoders
        self.busy = False

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # the thread ends either way; its jobs must not hang
            self._die(error)

    def _die(self, error: BaseException) -> None:
        logger.critical("worker %s stopped unexpectedly", self.runner.name, exc_info=error)
        for job in self._held:  # a job already answered keeps its answer
            job.fail(failure_caused_by(error, "the model's worker stopped unexpectedly while running this request"))
        self._held = []
        self.busy = False
        self._stop_encoding()
        if self._on_death is not None:
            self._on_death(self)

    def _loop(self) -> None:
        overlapping = True  # gather until a lone request shows there is nobody to wait for
        while True:
            limits = self._limits if overlapping else self._lone_limits
            try:
                batch = self._queue.take_batch(limits)
            except QueueClosed:
                self._stop_encoding()
                return
            arrivals = self._queue.arrivals
            self._held = batch
            with self._turn(batch):  # a job still waits (not started) while another model has the device
                self.busy = True
                self._run(batch)
            self.busy = False
            self._held = []
            # Waiting for company pays only while requests overlap. A batch of one during which
            # nothing arrived was a lone client: its next request would wait for nobody.
            overlapping = len(batch) > 1 or self._queue.arrivals != arrivals

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            job.started_at = now
        steps_done = 0

        def on_step(step: int, total: int, previews: PreviewSource) -> None:
            nonlocal steps_done
            steps_done += 1
            if all(job.cancelled for job in batch):
                raise _BatchAbandoned
            due = [step in preview_steps(job.work.partial_images, total) for job in batch]
            decoded = previews() if any(due) else None
            for job, wanted, shown in zip(batch, due, decoded or [None] * len(batch), strict=True):
                # A job whose clients left gets no progress: its previews are not encoded either.
                shown_now = _as_shown(job, shown) if wanted and shown and not job.cancelled else None
                job.report_progress(StepProgress(step, total, shown_now))

        outcome = "worker_died"  # unless a branch below says otherwise: a BaseException ends the thread
        call_s: float | None = None  # the pipeline call's own time, without the encoding after it
        try:
            results = self.runner.run([job.work for job in batch], on_step)
            call_s = time.monotonic() - now
            if len(results) != len(batch):
                raise ModelFailure(f"the model returned {len(results)} results for {len(batch)} requests")
        except _BatchAbandoned:
            outcome = "abandoned"
            for job in batch:
                job.fail(Cancelled("every client of this batch disconnected"))
        except OutOfMemory as error:
            outcome = "out_of_memory"
            self._retry_smaller(batch, error)
        except DiffuserError as error:
            outcome = "failed"
            for job in batch:
                job.fail(error)
        except Exception as error:  # the pipeline's own bug must not kill the worker
            outcome = "failed"
            logger.error(
                "pipeline call on %s failed for %d requests: %s", self.runner.name, len(batch), type(error).__name__
            )
            # The client learns that it failed, never the library's words; the cause (with its
            # traceback) is logged next to each request's id.
            for job in batch:
                job.fail(failure_caused_by(error, "the model failed while generating"))
        else:
            outcome = "ok"
            self._deliver(batch, results)
        finally:
            compute_s = call_s if call_s is not None else time.monotonic() - now
            self._report(BatchReport(self.runner.name, batch, compute_s, steps_done, outcome))

    def _deliver(self, batch: list[Job], results: list[list[GeneratedImage]]) -> None:
        """Settle each job with its images, encoded where it brought encoders: all of the
        batch's images at once on the encoding threads, each job settled as soon as its own
        are done. On a CPU the pipeline's threads hold every core during a call, so the encoding
        is done here, before the next batch, using every core; the last job's images are done
        before the next call starts."""
        delivering = [
            (job, [self._encoded(job, image) for image in images])
            for job, images in zip(batch, results, strict=True) if not job.cancelled
        ]
        for job, images in delivering:
            job.resolve([image.result() for image in images])

    def _encoded(self, job: Job, image: GeneratedImage) -> Future[GeneratedImage]:
        if job.encoders is None:
            return _settled(image)
        if self._encoding is None:
            self._encoding = ThreadPoolExecutor(self._encoding_threads, thread_name_prefix=f"encode-{self.runner.name}")
        return self._encoding.submit(_delivered, job, image)

    def _stop_encoding(self) -> None:
        if self._encoding is not None:
            self._encoding.shutdown(wait=False)

    def _report(self, report: BatchReport) -> None:
        """Figures are for logs and metrics; a broken observer must not stop the worker."""
        if self._observe is None:
            return
        try:
            self._observe(report)
        except Exception:
            logger.exception("batch observer failed on %s", self.runner.name)

    def _retry_smaller(self, batch: list[Job], error: OutOfMemory) -> None:
        """Halve an out-of-memory batch until it fits; a single job that still fails, fails."""
        if len(batch) == 1:
            batch[0].fail(error)
            return
        middle = len(batch) // 2
        logger.warning("out of memory on %s with %d jobs; retrying in halves", self.runner.name, len(batch))
        for half in (batch[:middle], batch[middle:]):
            self._run(half)
