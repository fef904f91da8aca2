"""Speed levers on the tiny families, CPU: step caching, compilation, int8 quantization.

Every arm runs the served code path (``load_model`` -> ``DiffusersRunner.run``, as a worker
calls it), arms alternate call by call so machine noise hits them alike, and each figure is a
ratio of medians against the plain arm of the same model. Image quality is the PSNR of the
arm's image against the plain one of the same seed (inf: identical pixels).

    python bench/speed.py [--runs 3] [--side 64] [--steps 12]   (writes bench/results/speed.md)

Tiny random-weight transformers have 1-2 blocks: what a cache skips costs little next to the
rest of the call, so the speed-ups here are far below the published GPU ones (1.8-2.8x on
FLUX.1-dev and Qwen-Image); the GPU scripts measure the real sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.conftest import TINY_CACHE

from bench.measure import cpu_pressure
from diffuser_api.config import Settings
from diffuser_api.domain import (
    ImageJob,
    MemoryOptions,
    Quantization,
    SpeedOptions,
    StepCache,
    Task,
)
from diffuser_api.models.checkpoint import probe_model
from diffuser_api.models.loading import load_model
from diffuser_api.models.registry import LoadedRunners, warm_up
from diffuser_api.models.runner import DiffusersRunner
from diffuser_api.models.spec import ModelSpec

RESULTS = ROOT / "bench" / "results"
SEED = 11


@dataclass(frozen=True)
class Arm:
    label: str
    runner: DiffusersRunner
    job: ImageJob


@dataclass(frozen=True)
class Row:
    model: str
    lever: str
    median_s: float
    speedup: float
    psnr_db: float
    note: str = ""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def call(arm: Arm) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    (images,) = arm.runner.run([arm.job], lambda step, total, previews: None)
    return time.perf_counter() - started, np.asarray(images[0].image)


def compare(model: str, arms: list[Arm], runs: int, notes: dict[str, str] | None = None) -> list[Row]:
    """``arms[0]`` is the plain arm; one untimed call each first (lazy set-up, compilation)."""
    images = {arm.label: call(arm)[1] for arm in arms}
    times: dict[str, list[float]] = {arm.label: [] for arm in arms}
    for _ in range(runs):
        for arm in arms:
            times[arm.label].append(call(arm)[0])
    base = statistics.median(times[arms[0].label])
    return [
        Row(model, arm.label, statistics.median(times[arm.label]), base / statistics.median(times[arm.label]),
            psnr(images[arm.label], images[arms[0].label]), (notes or {}).get(arm.label, ""))
        for arm in arms
    ]


def spec(source: str, **options) -> ModelSpec:
    return ModelSpec(id=source, source=source, devices=("cpu",), **options)


def job(side: int, steps: int, **fields) -> ImageJob:
    return ImageJob(task=Task.GENERATION, prompt="a lighthouse at dusk", width=side, height=side, steps=steps,
                    seeds=(SEED,), **fields)


def step_cache_rows(source: str, settings: Settings, side: int, steps: int, runs: int) -> list[Row]:
    caps = probe_model(spec(source), settings).capabilities
    runner = load_model(spec(source), settings).runners[0]
    base = job(side, steps, guidance_scale=caps.default_guidance_scale, true_cfg_scale=caps.default_true_cfg_scale,
               negative_prompt=caps.default_negative_prompt)
    arms = [Arm("uncached", runner, base)]
    arms += [Arm(method.value, runner, ImageJob(**{**base.__dict__, "step_cache": StepCache(method)}))
             for method in sorted(caps.step_caches)]
    return compare(source, arms, runs)


def compile_rows(settings: Settings, side: int, steps: int, runs: int) -> list[Row]:
    source = "tiny-sd"
    caps = probe_model(spec(source), settings).capabilities
    plain = load_model(spec(source), settings).runners[0]
    compiled_model = load_model(spec(source, speed=SpeedOptions(compile=True)), settings)
    started = time.perf_counter()
    warm_up(LoadedRunners(caps, compiled_model.runners, compiled_model.pipeline_class))
    compile_s = time.perf_counter() - started
    sd_job = job(side, steps, guidance_scale=caps.default_guidance_scale)
    return compare(source, [Arm("not compiled", plain, sd_job), Arm("compiled", compiled_model.runners[0], sd_job)],
                   runs, {"compiled": f"warm-up with compilation {compile_s:.1f} s"})


def quantization_rows(settings: Settings, side: int, steps: int, runs: int) -> list[Row]:
    source = "tiny-flux"
    plain = load_model(spec(source), settings)
    int8 = load_model(spec(source, memory=MemoryOptions(Quantization.INT8)), settings)
    flux_job = job(side, steps, guidance_scale=3.5, true_cfg_scale=1.0)
    weights = {label: model.resident_bytes()["cpu"] for label, model in (("float32", plain), ("int8", int8))}
    notes = {label: f"weights {size / 2**20:.2f} MiB" for label, size in weights.items()}
    return compare(source, [Arm("float32", plain.runners[0], flux_job), Arm("int8", int8.runners[0], flux_job)],
                   runs, notes)


def report(rows: list[Row], side: int, steps: int, runs: int, pressure: str) -> str:
    lines = [
        "# Speed levers on the tiny families (CPU)",
        "",
        f"{side}x{side}, {steps} steps, seed {SEED}, median of {runs} alternating calls per arm, "
        f"through `DiffusersRunner.run`. {pressure}.",
        "",
        "| model | lever | median s | speed-up | PSNR vs plain (dB) | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        quality = "identical" if row.psnr_db == float("inf") else f"{row.psnr_db:.1f}"
        cells = [row.model, row.lever, f"{row.median_s:.3f}", f"{row.speedup:.2f}x", quality, row.note]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Speed-ups are against the first row of the same model; tiny transformers have 1-2 blocks, "
              "so caches save little here (see the GPU scripts for real sizes)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    settings = Settings(_env_file=None, cache_dir=TINY_CACHE)
    sections: list[Callable[[], list[Row]]] = [
        lambda: step_cache_rows("tiny-flux", settings, args.side, args.steps, args.runs),
        lambda: step_cache_rows("tiny-qwen-image", settings, args.side, args.steps, args.runs),
        lambda: compile_rows(settings, args.side, args.steps, args.runs),
        lambda: quantization_rows(settings, args.side, args.steps, args.runs),
    ]
    rows: list[Row] = []
    for index, section in enumerate(sections, 1):
        print(f"section {index} of {len(sections)}", flush=True)
        rows += section()
    text = report(rows, args.side, args.steps, args.runs, cpu_pressure())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
