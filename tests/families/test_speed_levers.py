"""Step caching, compilation and the memory options on the tiny families, in process."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
import torch

from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import (
    STEP_CACHE_OFF,
    CpuOffload,
    ImageJob,
    MemoryOptions,
    Quantization,
    SpeedOptions,
    StepCache,
    StepCacheMethod,
    Task,
)
from diffuser_api.models.checkpoint import probe_model
from diffuser_api.models.loading import load_model
from diffuser_api.models.memory import check_memory_options
from diffuser_api.models.registry import LoadedRunners, warm_up
from diffuser_api.models.spec import ModelSpec
from tests.conftest import TINY_CACHE

pytestmark = pytest.mark.slow
SIZE = 64


def settings() -> Settings:
    return Settings(_env_file=None, cache_dir=TINY_CACHE)


def spec(source: str, **options) -> ModelSpec:
    return ModelSpec(id=source, source=source, **{"devices": ("cpu",), **options})


def job(step_cache: StepCache = STEP_CACHE_OFF, seed: int = 0, steps: int = 8) -> ImageJob:
    return ImageJob(task=Task.GENERATION, prompt="a red fox", width=SIZE, height=SIZE, steps=steps, seeds=(seed,),
                    guidance_scale=3.5, true_cfg_scale=1.0, step_cache=step_cache)


def pixels(runner, *jobs: ImageJob) -> list[np.ndarray]:
    results = runner.run(list(jobs), lambda step, total, previews: None)
    return [np.asarray(images[0].image, dtype=np.float64) for images in results]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def flux():
    return load_model(spec("tiny-flux", devices=("cpu", "cpu")), settings())


@pytest.fixture(scope="module")
def uncached(flux) -> np.ndarray:
    return pixels(flux.runners[0], job())[0]


@pytest.mark.parametrize("method", [StepCacheMethod.TAYLORSEER, StepCacheMethod.MAGCACHE,
                                    StepCacheMethod.FIRST_BLOCK_CACHE])
def test_a_cached_call_is_reproducible_close_to_uncached_and_leaves_no_hooks(flux, uncached, method):
    runner = flux.runners[0]
    transformer = runner.pipelines[Task.GENERATION].transformer
    (cached,) = pixels(runner, job(StepCache(method)))
    (again,) = pixels(runner, job(StepCache(method)))
    assert np.array_equal(cached, again), "the cache state must not carry over between calls"
    assert psnr(cached, uncached) > 20, "a cached image stays close to the uncached one"
    if method is StepCacheMethod.TAYLORSEER:  # it predicts whole steps: never exactly the uncached image
        assert not np.array_equal(cached, uncached)
    assert not transformer.is_cache_enabled, "the hooks are removed after the call"


def test_an_uncached_call_after_a_cached_one_is_exact(flux, uncached):
    pixels(flux.runners[0], job(StepCache(StepCacheMethod.TAYLORSEER)))
    assert np.array_equal(pixels(flux.runners[0], job())[0], uncached)


def test_the_cache_setting_is_part_of_the_batch_key(flux):
    runner = flux.runners[0]
    keys = {runner.batch_key(job(cache)) for cache in (STEP_CACHE_OFF, StepCache(StepCacheMethod.TAYLORSEER),
                                                      StepCache(StepCacheMethod.FIRST_BLOCK_CACHE, threshold=0.2))}
    assert len(keys) == 3
    assert runner.batch_key(job(seed=1)) == runner.batch_key(job(seed=2))


def test_two_workers_sharing_weights_keep_cached_and_uncached_calls_apart(flux):
    """Worker 0 runs cached calls while worker 1 runs uncached ones on the same transformer:
    each image equals the one it makes alone."""
    cached_job, plain_job = job(StepCache(StepCacheMethod.TAYLORSEER), seed=3), job(seed=4)
    (cached_alone,) = pixels(flux.runners[0], cached_job)
    (plain_alone,) = pixels(flux.runners[1], plain_job)
    results: dict[str, list[np.ndarray]] = {"cached": [], "plain": []}

    def work(runner, one_job, name):
        for _ in range(2):
            results[name] += pixels(runner, one_job)

    threads = [threading.Thread(target=work, args=(flux.runners[0], cached_job, "cached")),
               threading.Thread(target=work, args=(flux.runners[1], plain_job, "plain"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(image, cached_alone) for image in results["cached"])
    assert all(np.array_equal(image, plain_alone) for image in results["plain"])


def test_qwen_image_takes_block_caches_and_refuses_magcache():
    caps = probe_model(spec("tiny-qwen-image"), settings()).capabilities
    assert caps.step_caches == {StepCacheMethod.FIRST_BLOCK_CACHE, StepCacheMethod.TAYLORSEER}
    assert probe_model(spec("tiny-sd"), settings()).capabilities.step_caches == frozenset()
    with pytest.raises(ModelsFileError, match="speed.step_cache.method 'magcache' is not available for family qwen"):
        probe_model(spec("tiny-qwen-image", speed=SpeedOptions(StepCache(StepCacheMethod.MAGCACHE))), settings())


def test_int8_quantization_runs_on_cpu_and_the_budget_counts_fewer_bytes():
    plain = load_model(spec("tiny-flux"), settings())
    quantized = load_model(spec("tiny-flux", memory=MemoryOptions(Quantization.INT8)), settings())
    transformer = quantized.runners[0].pipelines[Task.GENERATION].transformer
    assert "Int8" in type(transformer.transformer_blocks[0].ff.net[2].weight).__name__
    assert quantized.resident_bytes()["cpu"] < 0.8 * plain.resident_bytes()["cpu"]
    (image,) = pixels(quantized.runners[0], job())
    assert image.shape == (SIZE, SIZE, 3)


def test_vae_tiling_is_switched_on():
    model = load_model(spec("tiny-sd", memory=MemoryOptions(vae_tiling=True)), settings())
    assert model.runners[0].pipelines[Task.GENERATION].vae.use_tiling


@pytest.mark.parametrize(
    ("memory", "expected"),
    [(MemoryOptions(Quantization.FP8), "memory.quantization 'fp8' needs a CUDA device"),
     (MemoryOptions(Quantization.NF4), "memory.quantization 'nf4' needs a CUDA device"),
     (MemoryOptions(cpu_offload=CpuOffload.MODEL), "memory.cpu_offload 'model' moves weights"),
     (MemoryOptions(cpu_offload=CpuOffload.SEQUENTIAL), "memory.cpu_offload 'sequential' moves weights")],
)
def test_options_that_need_cuda_are_refused_on_cpu_naming_the_option(memory, expected):
    with pytest.raises(ModelsFileError, match=expected):
        check_memory_options(spec("tiny-sd", memory=memory), ["cpu"])
    if memory.quantization is Quantization.NF4 and importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ModelsFileError, match="needs the bitsandbytes package"):
            check_memory_options(spec("tiny-sd", memory=memory), ["cuda:0"])
    else:
        check_memory_options(spec("tiny-sd", memory=memory), ["cuda:0"])


def test_a_quantization_whose_package_is_missing_stops_the_start_naming_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torchao" else real_find_spec(name))
    with pytest.raises(ModelsFileError, match=r"'int8' needs the torchao package.*diffuser-api\[quant\]"):
        check_memory_options(spec("tiny-sd", memory=MemoryOptions(Quantization.INT8)), ["cpu"])


def test_compiled_unet_compiles_during_warm_up_and_a_new_size_does_not_stall():
    model_spec = spec("tiny-sd", speed=SpeedOptions(compile=True))
    caps = probe_model(model_spec, settings()).capabilities
    assert caps.step_caches == frozenset()
    model = load_model(model_spec, settings())
    graphs = torch._dynamo.utils.counters["stats"]
    before_warm_up = graphs["unique_graphs"]
    warm_up(LoadedRunners(caps, model.runners, model.pipeline_class), sizes=2)
    compiled = graphs["unique_graphs"]
    assert compiled > before_warm_up  # the warm-up paid for the compilation
    runner = model.runners[0]
    sd_job = ImageJob(task=Task.GENERATION, prompt="x", width=96, height=64, steps=2, seeds=(0,), guidance_scale=7.5)
    pixels(runner, sd_job)
    # Counted, not timed: a new size compiles no new graph (dynamic shapes), so it cannot stall.
    assert graphs["unique_graphs"] == compiled
