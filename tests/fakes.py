"""A fake model for API tests: real engine and service, no torch.

Images are solid colours derived from prompt and seed, so tests can check that seeds
reproduce and differ without running a pipeline.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image

from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.domain import Capabilities, GeneratedImage, ImageJob, SizeRules, Task
from diffuser_api.engine import EngineLimits, StepCallback
from diffuser_api.errors import OutOfMemory
from diffuser_api.models.registry import LoadedRunners, ModelHandle, ModelRegistry

ALL_BUT_MULTI = frozenset(Task) - {Task.MULTI_IMAGE_EDIT}


# A closed gate that nobody opens fails the step instead of hanging the test run.
GATE_TIMEOUT_S = 10.0


def colour_of(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def preview_of(job: ImageJob, step: int) -> Image.Image:
    """Grey, brighter with every step, so tests can tell previews apart from finals."""
    return Image.new("RGB", (job.width, job.height), (step * 10 % 256,) * 3)


def image_job(
    prompt: str, *, seeds: tuple[int, ...] = (1,), size: tuple[int, int] = (64, 64), steps: int = 2
) -> ImageJob:
    return ImageJob(task=Task.GENERATION, prompt=prompt, width=size[0], height=size[1], steps=steps, seeds=seeds)


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
    """Implements ``ModelRunner`` with no torch; jobs share a batch when task, size and steps match.

    Its image colour is a function of (prompt, seed) alone, so a test can tell whether a result
    went to the right job and whether batching changed it. Tests hold a step shut with ``gate``
    (a blocked worker), slow every step with ``step_delay_s``, make prompts fail with
    ``fail_on``, and read back every batch it ran.
    """

    def __init__(
        self,
        name: str = "fake#0",
        *,
        step_delay_s: float = 0.0,
        fail_on: dict[str, Exception] | None = None,
        max_images: int | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.name = name
        self.step_delay_s = step_delay_s
        self.fail_on = fail_on or {}
        self.max_images = max_images
        if gate is None:
            gate = threading.Event()
            gate.set()
        self.gate = gate
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
                on_step(step, total, lambda step=step: [[preview_of(job, step) for _ in job.seeds] for job in jobs])
            return [[self._image(job, seed) for seed in job.seeds] for job in jobs]
        finally:
            record.finished_at = time.monotonic()

    @property
    def jobs_seen(self) -> list[ImageJob]:
        return [job for batch in self.batches for job in batch.jobs]

    def started(self, prompt: str) -> bool:
        return any(prompt in batch.prompts for batch in self.batches)

    def batch_of(self, prompt: str) -> RecordedBatch:
        return next(batch for batch in self.batches if prompt in batch.prompts)

    @staticmethod
    def _image(job: ImageJob, seed: int) -> GeneratedImage:
        image = Image.new("RGB", (job.width, job.height), colour_of(job.prompt, seed))
        return GeneratedImage(image, seed=seed, revised_prompt=job.prompt or None)


FAKE_EXTRAS = frozenset({"num_inference_steps", "seed", "guidance_scale", "negative_prompt", "strength"})


def fake_capabilities(tasks: frozenset[Task] = ALL_BUT_MULTI, extras: frozenset[str] = FAKE_EXTRAS) -> Capabilities:
    return Capabilities(
        family="fake",
        tasks=tasks,
        extras=extras,
        size=SizeRules(multiple=8, min_side=16, max_side=256, default_width=32, default_height=32),
        default_steps=4,
        default_guidance_scale=7.5,
        default_strength=0.8,
        variation_method="image-to-image with an empty prompt" if Task.VARIATION in tasks else None,
        max_input_images=3 if Task.MULTI_IMAGE_EDIT in tasks else 1,
    )


def fake_app(
    tmp_path: Path,
    runner: FakeRunner | None = None,
    *,
    tasks: frozenset[Task] = ALL_BUT_MULTI,
    extras: frozenset[str] = FAKE_EXTRAS,
    load_gate: threading.Event | None = None,
    limits: EngineLimits | None = None,
    tracer_provider: Any = None,
    **settings: Any,
) -> FastAPI:
    runner = runner or FakeRunner()

    def load() -> LoadedRunners:
        if load_gate is not None:
            assert load_gate.wait(10), "load gate never opened"
        return LoadedRunners(fake_capabilities(tasks, extras), [runner], "FakePipeline")

    # TestClient sends Host "testserver", which the loopback default refuses; tests of the
    # allow-list pass allowed_hosts=None to get the real default.
    settings.setdefault("allowed_hosts", ["*"])
    config = Settings(_env_file=None, model_id="fake-model", storage_dir=tmp_path / "images", **settings)
    handle = ModelHandle(
        "fake-model",
        load,
        limits or EngineLimits(request_timeout_s=10.0),
        disabled_tasks=frozenset(config.disabled_tasks),
    )
    return create_app(
        config, ModelRegistry([handle], strict_names=config.strict_model_names), tracer_provider=tracer_provider
    )


def png_bytes(size: tuple[int, int] = (40, 40), colour: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()
