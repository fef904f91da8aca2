"""A model runner with no torch, for driving the real engine in milliseconds.

Its image colour is a function of (prompt, seed) alone, so a test can tell whether a result
went to the right job and whether batching changed it. Tests hold a step shut with ``gate``
(a blocked worker) or slow every step with ``step_delay_s``, and read back every batch it ran.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from diffuser_api.domain import GeneratedImage, ImageJob, Task
from diffuser_api.engine import StepCallback
from diffuser_api.errors import OutOfMemory

# A closed gate that nobody opens fails the step instead of hanging the test run.
GATE_TIMEOUT_S = 5.0


def image_job(
    prompt: str, *, seeds: tuple[int, ...] = (1,), size: tuple[int, int] = (64, 64), steps: int = 2
) -> ImageJob:
    return ImageJob(task=Task.GENERATION, prompt=prompt, width=size[0], height=size[1], steps=steps, seeds=seeds)


def colour_for(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


@dataclass
class RecordedBatch:
    jobs: tuple[ImageJob, ...]
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    steps: int = 0

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(job.prompt for job in self.jobs)

    @property
    def images(self) -> int:
        return sum(job.n for job in self.jobs)


class FakeRunner:
    """Implements ``ModelRunner``; jobs share a batch when task, size and steps match."""

    def __init__(
        self,
        name: str = "cpu",
        *,
        step_delay_s: float = 0.0,
        fail_on: dict[str, Exception] | None = None,
        max_images: int | None = None,
    ) -> None:
        self.name = name
        self.step_delay_s = step_delay_s
        self.fail_on = fail_on or {}
        self.max_images = max_images
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[RecordedBatch] = []

    def batch_key(self, job: ImageJob) -> Hashable:
        return (job.task, job.width, job.height, job.steps)

    def run(self, jobs: Sequence[ImageJob], on_step: StepCallback) -> list[list[GeneratedImage]]:
        record = RecordedBatch(tuple(jobs))
        self.batches.append(record)
        try:
            for job in jobs:
                if job.prompt in self.fail_on:
                    raise self.fail_on[job.prompt]
            if self.max_images is not None and record.images > self.max_images:
                raise OutOfMemory(f"{record.images} images do not fit; at most {self.max_images} do")
            total = jobs[0].steps
            for step in range(1, total + 1):
                if not self.gate.wait(GATE_TIMEOUT_S):
                    raise TimeoutError("the test never opened the runner's gate")
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
                record.steps += 1
                on_step(
                    step, total, lambda step=step: [[self._image(job, -step).image for _ in job.seeds] for job in jobs]
                )
            return [[self._image(job, seed) for seed in job.seeds] for job in jobs]
        finally:
            record.finished_at = time.monotonic()

    def started(self, prompt: str) -> bool:
        return any(prompt in batch.prompts for batch in self.batches)

    def batch_of(self, prompt: str) -> RecordedBatch:
        return next(batch for batch in self.batches if prompt in batch.prompts)

    @staticmethod
    def _image(job: ImageJob, seed: int) -> GeneratedImage:
        return GeneratedImage(Image.new("RGB", (job.width, job.height), colour_for(job.prompt, seed)), seed=seed)
