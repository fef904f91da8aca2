"""A fake model for API tests: real engine and service, no torch.

Images are solid colours derived from prompt and seed, so tests can check that seeds
reproduce and differ without running a pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Hashable, Sequence
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
from diffuser_api.models.registry import ModelRegistry, ProbedModel
from diffuser_api.models.spec import AdapterSpec, ModelDefaults, ModelSpec, PresetSpec, ServingPlan

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
        return (job.task, job.width, job.height, job.steps, job.loras)

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


@dataclass
class FakeLoadedModel:
    """Implements ``LoadedModel``: fake bytes on a fake device, offload/restore/release counted."""

    runners: list[FakeRunner]
    weights: dict[str, int]
    working: dict[str, int]
    can_offload: bool = True
    pipeline_class: str = "FakePipeline"
    adapters: dict[str, int] = field(default_factory=dict)  # device -> bytes of LoRA adapters held now
    offloads: int = 0
    restores: int = 0
    released: bool = False
    on_host: bool = False

    def resident_bytes(self) -> dict[str, int]:
        return {} if self.on_host or self.released else dict(self.weights)

    def working_bytes(self) -> dict[str, int]:
        return dict(self.working)

    def adapter_bytes(self) -> dict[str, int]:
        return {} if self.on_host or self.released else dict(self.adapters)

    def loaded_adapters(self) -> tuple[str, ...]:
        return ()

    def offload(self) -> None:
        assert self.can_offload and not self.on_host and not self.released
        self.on_host = True
        self.offloads += 1

    def restore(self) -> None:
        assert self.on_host and not self.released
        self.on_host = False
        self.restores += 1

    def release(self) -> None:
        assert not self.released
        self.released = True


@dataclass
class FakeModel:
    """One entry of a fake models file, and what happened to its loads.

    ``weight_bytes`` and ``working_bytes`` are what each load "measures" on ``device``;
    ``load_gate`` holds every load until set; ``load_error`` makes loads fail (clear it to let
    a later one succeed); ``probe_error`` makes the checkpoint unreadable. The runner keeps its
    batches across loads, so a test sees which model served what.
    """

    id: str
    runner: FakeRunner | None = None
    device: str = "fake"
    tasks: frozenset[Task] = ALL_BUT_MULTI
    extras: frozenset[str] = FAKE_EXTRAS
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    weight_bytes: int = 0
    working_bytes: int = 0
    can_offload: bool = True
    limits: EngineLimits = field(default_factory=lambda: EngineLimits(request_timeout_s=10.0))
    disabled_tasks: frozenset[Task] = frozenset()
    variation_prompt: str = ""
    variation_strength: float = 0.7
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    load_gate: threading.Event | None = None
    load_delay_s: float = 0.0
    load_error: Exception | None = None
    probe_error: Exception | None = None
    loaded: list[FakeLoadedModel] = field(default_factory=list)  # one per successful cold load
    load_attempts: int = 0
    adapters: tuple[AdapterSpec, ...] = ()  # registered LoRA adapters (the fake pipeline "supports" LoRA)
    lora: bool = True  # whether its pipeline can load LoRA adapters

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = FakeRunner(f"{self.device}#0")

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            id=self.id, source=self.id, aliases=self.aliases, pinned=self.pinned, devices=(self.device,),
            disabled_tasks=self.disabled_tasks, variation_prompt=self.variation_prompt,
            variation_strength=self.variation_strength, defaults=self.defaults, engine=self.limits,
            adapters=self.adapters,
        )

    def probe(self) -> ProbedModel:
        if self.probe_error is not None:
            raise self.probe_error
        caps = fake_capabilities(self.tasks, self.extras).without(self.disabled_tasks)
        # As the real probe does: the model's own defaults are folded into its capabilities.
        caps = dataclasses.replace(
            caps,
            lora=self.lora,
            default_steps=self.defaults.steps or caps.default_steps,
            default_guidance_scale=(
                caps.default_guidance_scale if self.defaults.guidance_scale is None else self.defaults.guidance_scale
            ),
        )
        return ProbedModel(caps, "FakePipeline")

    def load(self) -> FakeLoadedModel:
        self.load_attempts += 1
        if self.load_gate is not None:
            assert self.load_gate.wait(GATE_TIMEOUT_S), "load gate never opened"
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        if self.load_error is not None:
            raise self.load_error
        assert self.runner is not None
        loaded = FakeLoadedModel(
            [self.runner], {self.device: self.weight_bytes}, {self.device: self.working_bytes}, self.can_offload
        )
        self.loaded.append(loaded)
        return loaded

    @property
    def offloads(self) -> int:
        return sum(loaded.offloads for loaded in self.loaded)

    @property
    def restores(self) -> int:
        return sum(loaded.restores for loaded in self.loaded)

    @property
    def releases(self) -> int:
        return sum(loaded.released for loaded in self.loaded)


def fake_registry(
    models: Sequence[FakeModel],
    *,
    default: str | None = None,
    max_loaded_models: int | None = None,
    memory_budget_bytes: int | None = None,
    host_memory_budget_bytes: int | None = None,
    strict_names: bool = False,
    clock: Callable[[], float] = time.monotonic,
    presets: Sequence[PresetSpec] = (),
) -> ModelRegistry:
    """A registry of fake models; the first is the default unless ``default`` names another;
    ``clock`` times the back-off of failed loads."""
    by_id = {model.id: model for model in models}
    plan = ServingPlan(
        models=tuple(model.spec for model in models),
        default=default or models[0].id,
        max_loaded_models=max_loaded_models,
        memory_budget_bytes=memory_budget_bytes,
        host_memory_budget_bytes=host_memory_budget_bytes,
        presets=tuple(presets),
    )
    return ModelRegistry(
        plan,
        probe=lambda spec: by_id[spec.id].probe(),
        loader=lambda spec: by_id[spec.id].load(),
        strict_names=strict_names,
        clock=clock,
    )


def fake_settings(tmp_path: Path, **settings: Any) -> Settings:
    # TestClient sends Host "testserver", which the loopback default refuses; tests of the
    # allow-list pass allowed_hosts=None to get the real default.
    settings.setdefault("allowed_hosts", ["*"])
    # The jobs database lives under the cache dir: each test gets its own.
    settings.setdefault("cache_dir", tmp_path / "cache")
    return Settings(_env_file=None, model_id="fake-model", storage_dir=tmp_path / "images", **settings)


def fake_models_app(
    tmp_path: Path,
    models: Sequence[FakeModel],
    *,
    default: str | None = None,
    max_loaded_models: int | None = None,
    memory_budget_bytes: int | None = None,
    host_memory_budget_bytes: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    tracer_provider: Any = None,
    presets: Sequence[PresetSpec] = (),
    **settings: Any,
) -> FastAPI:
    """An app serving several fake models (see ``fake_registry``)."""
    config = fake_settings(tmp_path, **settings)
    registry = fake_registry(
        models, default=default, max_loaded_models=max_loaded_models, memory_budget_bytes=memory_budget_bytes,
        host_memory_budget_bytes=host_memory_budget_bytes, strict_names=config.strict_model_names, clock=clock,
        presets=presets,
    )
    return create_app(config, registry, tracer_provider=tracer_provider)


def fake_app(
    tmp_path: Path,
    runner: FakeRunner | None = None,
    *,
    tasks: frozenset[Task] = ALL_BUT_MULTI,
    extras: frozenset[str] = FAKE_EXTRAS,
    load_gate: threading.Event | None = None,
    limits: EngineLimits | None = None,
    tracer_provider: Any = None,
    device: str = "fake",
    **settings: Any,
) -> FastAPI:
    """One pinned fake model, "fake-model", as ``DIFFUSER_MODEL_ID`` alone serves one model
    (on ``device``: "cpu" takes the paths a model on the CPU takes)."""
    config = fake_settings(tmp_path, **settings)
    model = FakeModel(
        "fake-model",
        runner or FakeRunner(),
        tasks=tasks,
        extras=extras,
        pinned=True,
        limits=limits or EngineLimits(request_timeout_s=10.0),
        disabled_tasks=frozenset(config.disabled_tasks),
        variation_prompt=config.variation_prompt,
        variation_strength=config.variation_strength,
        defaults=ModelDefaults(steps=config.default_steps, guidance_scale=config.default_guidance_scale),
        load_gate=load_gate,
        device=device,
    )
    registry = fake_registry([model], strict_names=config.strict_model_names)
    return create_app(config, registry, tracer_provider=tracer_provider)


def png_bytes(size: tuple[int, int] = (40, 40), colour: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def threads_calling(monkeypatch: Any, owner: type, method: str) -> list[str]:
    """The names of the threads that call ``owner.method`` from now on (it still does its work)."""
    threads: list[str] = []
    original = getattr(owner, method)

    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, recorded)
    return threads
