"""Runs batches of jobs on one copy of a diffusers model; the engine's worker drives it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from PIL.Image import Image

from diffuser_api.domain import GeneratedImage, ImageJob, Task
from diffuser_api.engine import StepCallback
from diffuser_api.errors import OutOfMemory
from diffuser_api.models.adapters import DeviceAdapters
from diffuser_api.models.cpu_threads import CpuThreads
from diffuser_api.models.family import Family
from diffuser_api.models.preview_modes import PreviewDecoder
from diffuser_api.models.step_cache import StepCacheGate
from diffuser_api.models.tasks import takes

logger = logging.getLogger(__name__)


class DiffusersRunner:
    """One device's pipelines for every task, sharing one set of weights (``from_pipe``).

    Only its worker thread calls it, so the shared scheduler is never used concurrently.
    ``adapters`` (the device's, shared by its runners) applies each call's LoRA set.
    """

    def __init__(
        self,
        name: str,
        family: Family,
        pipelines: dict[Task, Any],
        preview: PreviewDecoder,
        adapters: DeviceAdapters | None = None,
        step_cache_gate: StepCacheGate | None = None,
        cpu_threads: CpuThreads | None = None,
    ) -> None:
        """``step_cache_gate`` is shared by every runner on the same denoiser; None where the
        family has no cache hooks (validation never sends those a cached job). ``cpu_threads``
        gives each call on a CPU its share of the cores (None: torch's own count, as on GPUs)."""
        self.name = name
        self._cpu_threads = cpu_threads
        self._step_cache_gate = step_cache_gate
        self.family = family
        self.pipelines = pipelines
        self.preview = preview
        self.adapters = adapters
        # Pipelines with height/width get the job's size; the others (SD img2img) take it
        # from the input image, which the service has resized to it.
        self._sized = {task for task, pipe in pipelines.items() if takes(pipe, "height") and takes(pipe, "width")}

    def batch_key(self, job: ImageJob) -> Hashable:
        call_level = (job.task, job.width, job.height, job.steps, job.guidance_scale, job.true_cfg_scale, job.strength,
                      job.loras, job.step_cache)
        if self.family.batches_across_requests:
            return call_level
        return (*call_level, id(job))

    def run(self, jobs: Sequence[ImageJob], on_step: StepCallback) -> list[list[GeneratedImage]]:
        first = jobs[0]
        pipe = self.pipelines[first.task]

        def step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            def previews() -> list[list[Image]]:
                return per_job(jobs, self.preview(pipeline, tensors["latents"], first.height, first.width))

            on_step(step + 1, pipeline.num_timesteps, previews)
            return tensors

        kwargs = self.family.call_kwargs(first.task, jobs)
        if first.task in self._sized:
            kwargs.update(height=first.height, width=first.width)
        out_of_memory = False
        adapters = self.adapters.applied(first.loras) if self.adapters is not None else contextlib.nullcontext()
        cores = self._cpu_threads.share() if self._cpu_threads is not None else contextlib.nullcontext()
        try:
            with cores, adapters, torch.inference_mode(), self.family.call_scope(jobs), self._step_cache(first):
                images = pipe(
                    **kwargs,
                    output_type="pil",
                    callback_on_step_end=step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).images
        except torch.OutOfMemoryError as error:
            # The allocator's report (sizes, process ids, tuning advice) is for the operator.
            logger.warning("out of device memory on %s with %d images: %s", self.name, sum(j.n for j in jobs), error)
            out_of_memory = True
        if out_of_memory:
            # Raised outside the except block: torch's error holds the failed call's frames and
            # their tensors, which must be freed before the engine retries a smaller batch.
            raise OutOfMemory(
                f"the device ran out of memory on {self.name} running this request; "
                "ask for fewer images (n) or a smaller size"
            )
        results: list[list[GeneratedImage]] = []
        for job, job_images in zip(jobs, per_job(jobs, images), strict=True):
            revised, tokens = self.used_prompt(job.prompt)
            results.append(
                [
                    GeneratedImage(image=image, seed=seed, revised_prompt=revised, prompt_tokens=tokens)
                    for image, seed in zip(job_images, job.seeds, strict=True)
                ]
            )
        return results

    def _step_cache(self, job: ImageJob) -> AbstractContextManager[None]:
        if self._step_cache_gate is None:
            if job.step_cache.on:
                raise ValueError(f"{self.family.name} has no step cache hooks; validation should have refused this")
            return contextlib.nullcontext()
        # An edit with strength s runs int(steps * s) steps; MagCache maps its ratios onto those.
        denoising_steps = job.steps if job.strength is None else max(1, int(job.steps * job.strength))
        return self._step_cache_gate.applied(job.step_cache, denoising_steps)

    def used_prompt(self, prompt: str) -> tuple[str | None, int | None]:
        """The prompt as the text encoder sees it (truncated where diffusers truncates it),
        and its token count."""
        if not prompt:
            return None, None
        tokenizer = getattr(self.pipelines[next(iter(self.pipelines))], "tokenizer", None)
        if tokenizer is None:
            return prompt, None
        limit = tokenizer.model_max_length
        tokens = len(tokenizer(prompt).input_ids)
        if tokens <= limit:
            return prompt, tokens
        kept = tokenizer(prompt, truncation=True, max_length=limit).input_ids
        return tokenizer.decode(kept, skip_special_tokens=True), len(kept)


def per_job(jobs: Sequence[ImageJob], rows: Sequence[Image]) -> list[list[Image]]:
    """Split a call's output rows back into each job's ``n`` images."""
    split: list[list[Image]] = []
    offset = 0
    for job in jobs:
        split.append(list(rows[offset : offset + job.n]))
        offset += job.n
    return split
