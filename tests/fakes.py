"""A fake model for API tests: real engine and service, no torch.

Images are solid colours derived from prompt and seed, so tests can check that seeds
reproduce and differ without running a pipeline.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from PIL import Image

from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.domain import Capabilities, GeneratedImage, ImageJob, SizeRules, Task
from diffuser_api.engine import EngineLimits, StepCallback
from diffuser_api.models.registry import LoadedRunners, ModelHandle, ModelRegistry

ALL_BUT_MULTI = frozenset(Task) - {Task.MULTI_IMAGE_EDIT}


def colour_of(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def preview_of(job: ImageJob, step: int) -> Image.Image:
    """Grey, brighter with every step, so tests can tell previews apart from finals."""
    return Image.new("RGB", (job.width, job.height), (step * 10 % 256,) * 3)


class FakeRunner:
    name = "fake#0"

    def __init__(self, *, fail_on_prompt: str | None = None, gate: threading.Event | None = None) -> None:
        self.fail_on_prompt = fail_on_prompt
        self.gate = gate
        self.jobs_seen: list[ImageJob] = []

    def batch_key(self, job: ImageJob) -> Any:
        return (job.task, job.width, job.height, job.steps)

    def run(self, jobs: Sequence[ImageJob], on_step: StepCallback) -> list[list[GeneratedImage]]:
        self.jobs_seen.extend(jobs)
        steps = jobs[0].steps
        for step in range(1, steps + 1):
            if self.gate is not None:
                assert self.gate.wait(10), "test gate never opened"
            on_step(step, steps, lambda step=step: [[preview_of(job, step) for _ in job.seeds] for job in jobs])
        if any(job.prompt == self.fail_on_prompt for job in jobs):
            raise RuntimeError("fake pipeline exploded")
        return [
            [
                GeneratedImage(Image.new("RGB", (job.width, job.height), colour_of(job.prompt, seed)), seed, job.prompt)
                for seed in job.seeds
            ]
            for job in jobs
        ]


def fake_capabilities(tasks: frozenset[Task] = ALL_BUT_MULTI) -> Capabilities:
    return Capabilities(
        family="fake",
        tasks=tasks,
        extras=frozenset({"num_inference_steps", "seed", "guidance_scale", "negative_prompt", "strength"}),
        size=SizeRules(multiple=8, min_side=16, max_side=256, default_width=32, default_height=32),
        default_steps=4,
        default_guidance_scale=7.5,
        default_strength=0.8,
        variation_method="image-to-image with an empty prompt" if Task.VARIATION in tasks else None,
    )


def fake_app(
    tmp_path: Path,
    runner: FakeRunner | None = None,
    *,
    tasks: frozenset[Task] = ALL_BUT_MULTI,
    load_gate: threading.Event | None = None,
    limits: EngineLimits | None = None,
    tracer_provider: Any = None,
    **settings: Any,
) -> FastAPI:
    runner = runner or FakeRunner()

    def load() -> LoadedRunners:
        if load_gate is not None:
            assert load_gate.wait(10), "load gate never opened"
        return LoadedRunners(fake_capabilities(tasks), [runner], "FakePipeline")

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
