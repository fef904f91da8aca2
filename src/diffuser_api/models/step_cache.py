"""Step caching with diffusers' own hooks, switched per pipeline call.

The hooks live on the denoiser module, which every task pipeline and every second worker on
a device share (``from_pipe``), and they keep state across the steps of a call. So a cached
call must have the denoiser to itself: ``StepCacheGate`` lets uncached calls run side by side
and gives a cached call the denoiser alone, with its hooks added before and removed after.
The pipeline resets the hooks' state at the end of each call (``maybe_free_model_hooks``),
and removing them also drops it, so no state crosses calls or workers. The cache decides per
call which steps it skips, so a seeded image may differ between alone and batched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from diffuser_api.domain import StepCache, StepCacheMethod


def cache_config(cache: StepCache, steps: int) -> Any:
    """The diffusers config for one call of ``steps`` steps; unset knobs keep diffusers' defaults."""
    knobs: dict[str, Any] = {}
    if cache.method is StepCacheMethod.FIRST_BLOCK_CACHE:
        if cache.threshold is not None:
            knobs["threshold"] = cache.threshold
        return FirstBlockCacheConfig(**knobs)
    if cache.method is StepCacheMethod.TAYLORSEER:
        if cache.cache_interval is not None:
            knobs["cache_interval"] = cache.cache_interval
        # float32 factors: bfloat16 ones drift visibly on float32 (CPU) weights.
        return TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **knobs)
    if cache.method is StepCacheMethod.MAGCACHE:
        if cache.threshold is not None:
            knobs["threshold"] = cache.threshold
        # The ratios are calibrated on FLUX.1 (the only family offering magcache); diffusers
        # interpolates them to the call's step count.
        return MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps, **knobs)
    raise ValueError(f"no cache config for {cache.method}")


class StepCacheGate:
    """One per shared denoiser: many uncached calls at once, or one cached call alone. A
    waiting cached call goes before uncached calls that arrive after it, so it is not starved."""

    def __init__(self, denoiser: Any) -> None:
        self._denoiser = denoiser
        self._turn = threading.Condition()
        self._uncached_calls = 0
        self._cached_call = False
        self._cached_waiting = 0

    @contextlib.contextmanager
    def applied(self, cache: StepCache, steps: int) -> Iterator[None]:
        if not cache.on:
            with self._uncached():
                yield
            return
        with self._alone():
            self._denoiser.enable_cache(cache_config(cache, steps))
            try:
                yield
            finally:
                self._denoiser.disable_cache()

    @contextlib.contextmanager
    def _uncached(self) -> Iterator[None]:
        with self._turn:
            self._turn.wait_for(lambda: not self._cached_call and not self._cached_waiting)
            self._uncached_calls += 1
        try:
            yield
        finally:
            with self._turn:
                self._uncached_calls -= 1
                self._turn.notify_all()

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        with self._turn:
            self._cached_waiting += 1
            self._turn.wait_for(lambda: not self._cached_call and not self._uncached_calls)
            self._cached_waiting -= 1
            self._cached_call = True
        try:
            yield
        finally:
            with self._turn:
                self._cached_call = False
                self._turn.notify_all()
