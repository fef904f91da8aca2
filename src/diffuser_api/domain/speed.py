"""Speed and memory options of a served model, as plain values (no torch, no diffusers).

Step caching skips work in denoising steps whose result it predicts from earlier ones: the
models file sets a model's default, a request may pick another (``step_cache``). Compilation
and the memory options are per model only: they change how the weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StepCacheMethod(StrEnum):
    """diffusers' cache hooks, by the name a request and the models file use."""

    OFF = "off"
    FIRST_BLOCK_CACHE = "first_block_cache"
    TAYLORSEER = "taylorseer"
    MAGCACHE = "magcache"


class Quantization(StrEnum):
    NONE = "none"
    INT8 = "int8"  # torchao int8 weight-only: runs on CPU and GPU
    FP8 = "fp8"  # torchao float8 weight-only: CUDA only
    NF4 = "nf4"  # bitsandbytes 4-bit: CUDA only


class CpuOffload(StrEnum):
    NONE = "none"
    MODEL = "model"  # whole components move to the accelerator when used
    SEQUENTIAL = "sequential"  # layer by layer: least memory, slowest


@dataclass(frozen=True)
class StepCache:
    """One cache method and its knob; ``None`` knobs keep diffusers' defaults.

    ``threshold`` is the error First-Block-Cache and MagCache accept before they compute a step
    in full (higher: faster, further from the uncached image); TaylorSeer instead computes every
    ``cache_interval``-th step in full and predicts the others.
    """

    method: StepCacheMethod
    threshold: float | None = None
    cache_interval: int | None = None

    @property
    def on(self) -> bool:
        return self.method is not StepCacheMethod.OFF


STEP_CACHE_OFF = StepCache(StepCacheMethod.OFF)


@dataclass(frozen=True)
class SpeedOptions:
    step_cache: StepCache = STEP_CACHE_OFF  # the default for the model's requests
    compile: bool = False  # regional torch.compile of the denoiser, during warm-up


@dataclass(frozen=True)
class MemoryOptions:
    quantization: Quantization = Quantization.NONE
    cpu_offload: CpuOffload = CpuOffload.NONE
    vae_tiling: bool = False
