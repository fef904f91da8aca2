"""The baseline: a pipeline called the way a script calls diffusers, with no server in between.

Its call arguments come from the family module the server uses, so both run the same work
(prompts, per-image generators, default guidance) and the ratio isolates serving costs.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from bench.measure import Measurement
from diffuser_api.domain import ImageJob, Task
from diffuser_api.models.families import family_for
from diffuser_api.models.family import Family
from diffuser_api.models.tiny import ensure_tiny_model

PROMPT = "a watercolor fox"


class DirectPipeline:
    def __init__(self, pipe: Any, family: Family) -> None:
        self.pipe = pipe
        self.family = family
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def tiny(cls, cache_dir: Path, model_id: str = "tiny-sd") -> DirectPipeline:
        pipe = DiffusionPipeline.from_pretrained(str(ensure_tiny_model(model_id, cache_dir)))
        return cls(pipe, family_for(type(pipe).__name__))

    def _call(self, batch: int, side: int, steps: int, callback: Any = None) -> float:
        jobs = [
            ImageJob(task=Task.GENERATION, prompt=PROMPT, width=side, height=side, steps=steps, seeds=(seed,),
                     guidance_scale=self.family.default_guidance_scale)
            for seed in range(batch)
        ]
        # The size is added per call, as the server's runner adds it for pipelines that take one.
        kwargs = self.family.call_kwargs(Task.GENERATION, jobs) | {"height": side, "width": side}
        started = time.perf_counter()
        with torch.inference_mode():
            self.pipe(**kwargs, output_type="pil", callback_on_step_end=callback)
        return time.perf_counter() - started

    def warm_up(self, batch: int, side: int, steps: int) -> None:
        """First calls at a new size allocate."""
        self._call(batch, side, steps)

    def measure(self, label: str, *, batch: int, side: int, steps: int, calls: int,
                warm_up: bool = True) -> Measurement:
        if warm_up:
            self.warm_up(batch, side, steps)
        latencies = tuple(self._call(batch, side, steps) for _ in range(calls))
        return Measurement(label, side, steps, clients=1, batch=batch, images=batch * calls,
                           wall_s=sum(latencies), latencies_s=latencies)

    def step_time_s(self, side: int, steps: int) -> float:
        """Median time between denoising steps: the unit a cancelled request is judged in."""
        marks: list[float] = []

        def mark(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            marks.append(time.perf_counter())
            return tensors

        self._call(1, side, steps, callback=mark)
        return statistics.median(later - earlier for earlier, later in itertools.pairwise(marks))
