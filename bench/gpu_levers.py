"""The speed and memory levers on a pipeline already built on its device: one table per model.

Shared by the GPU scripts (``gpu_sdxl.py``, ``gpu_flux.py``, ``gpu_qwen_image_edit.py``).
Every arm runs the served code path (``runners_for_pipeline`` -> ``DiffusersRunner.run``);
speed-ups are against the plain bfloat16 call of the same job, image differences are PSNR
against its pixels (same seed). The arms that change the weights run last, in this order:
step caches and previews (nothing changes), compilation (undone after), quantization
(irreversible: fp8 weight-only on CUDA, int8 on the CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from diffuser_api.domain import ImageJob, Quantization, StepCache
from diffuser_api.models.compilation import compile_denoiser
from diffuser_api.models.family import Family
from diffuser_api.models.loading import runners_for_pipeline
from diffuser_api.models.memory import tensor_bytes

PREVIEWS = 3  # partial images per request, as OpenAI's maximum


@dataclass(frozen=True)
class LeverRow:
    lever: str
    seconds: float
    speedup: float
    psnr_db: float | None
    note: str = ""


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def _denoiser_bytes(pipe: Any) -> int:
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    return sum(tensor_bytes(tensor) for tensor in (*denoiser.parameters(), *denoiser.buffers()))


def measure_levers(
    pipe: Any, family: Family, device: str, job: ImageJob, calls: int = 1,
    progress: Callable[[str], None] = print,
) -> list[LeverRow]:
    runner = runners_for_pipeline(pipe, family, [device])[0]

    def timed(one_job: ImageJob, with_previews: bool = False) -> tuple[float, np.ndarray]:
        def on_step(step: int, total: int, previews: Callable[[], Any]) -> None:
            if with_previews and step % max(1, total // (PREVIEWS + 1)) == 0 and step < total:
                previews()

        _sync(device)
        started = time.perf_counter()
        (images,) = runner.run([one_job], on_step)
        _sync(device)
        return time.perf_counter() - started, np.asarray(images[0].image)

    def median(one_job: ImageJob, **options: Any) -> tuple[float, np.ndarray]:
        runs = [timed(one_job, **options) for _ in range(calls)]
        return statistics.median(seconds for seconds, _ in runs), runs[-1][1]

    progress("levers: plain call")
    timed(job)  # warm-up at this size
    base_s, base = median(job)
    rows = [LeverRow("plain (bfloat16)" if device.startswith("cuda") else "plain", base_s, 1.0, None,
                     f"denoiser weights {_size(_denoiser_bytes(pipe))}")]
    for method in sorted(family.step_caches):
        progress(f"levers: step cache {method}")
        seconds, image = median(replace(job, step_cache=StepCache(method)))
        rows.append(LeverRow(f"step cache {method}", seconds, base_s / seconds, _psnr(image, base)))
    progress("levers: previews")
    seconds, image = median(job, with_previews=True)
    rows.append(LeverRow(f"{PREVIEWS} previews", seconds, base_s / seconds, _psnr(image, base),
                         f"overhead {100 * (seconds / base_s - 1):+.1f} %"))
    progress("levers: compile (the first call compiles)")
    what = compile_denoiser(pipe)  # only wraps the modules: the next call compiles
    compile_s, _ = timed(job)
    seconds, image = median(job)
    rows.append(LeverRow("compile", seconds, base_s / seconds, _psnr(image, base),
                         f"{what}; first call {compile_s:.1f} s"))
    _uncompile(pipe)
    quantization = Quantization.FP8 if device.startswith("cuda") else Quantization.INT8
    progress(f"levers: {quantization} weight-only")
    _quantize(pipe, quantization)
    timed(job)
    seconds, image = median(job)
    rows.append(LeverRow(f"{quantization} weights", seconds, base_s / seconds, _psnr(image, base),
                         f"denoiser weights {_size(_denoiser_bytes(pipe))}"))
    return rows


def _uncompile(pipe: Any) -> None:
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    for module in denoiser.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()


def _quantize(pipe: Any, quantization: Quantization) -> None:
    """The denoiser's linear layers in place, as ``memory.quantization`` loads them."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    quantize_(denoiser, Int8WeightOnlyConfig() if quantization is Quantization.INT8 else Float8WeightOnlyConfig())


def lever_table(rows: list[LeverRow], title: str) -> list[str]:
    lines = [f"### {title}", "", "| lever | s per call | speed-up | PSNR vs plain (dB) | note |",
             "|---|---|---|---|---|"]
    for row in rows:
        quality = "–" if row.psnr_db is None else "identical" if row.psnr_db == float("inf") else f"{row.psnr_db:.1f}"
        lines.append(f"| {row.lever} | {row.seconds:.2f} | {row.speedup:.2f}× | {quality} | {row.note} |")
    return lines
