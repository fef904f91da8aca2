"""Served models by id. Loading happens off the event loop; /health reads the status.

This module imports no torch: a handle gets a ``loader`` callable, so API tests can serve a
fake model through the real engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image

from diffuser_api.domain import Capabilities, ImageJob, Task
from diffuser_api.engine import Engine, EngineLimits, ModelRunner
from diffuser_api.engine.worker import BatchObserver
from diffuser_api.errors import ModelNotFound, Unavailable

logger = logging.getLogger(__name__)

# Names OpenAI clients send by default; they reach the default model unless names are strict.
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")


class ModelStatus(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class LoadedRunners:
    capabilities: Capabilities
    runners: Sequence[ModelRunner]
    pipeline_class: str


class ModelHandle:
    def __init__(
        self,
        model_id: str,
        loader: Callable[[], LoadedRunners],
        limits: EngineLimits,
        disabled_tasks: frozenset[Task] = frozenset(),
        warmup: bool = False,
    ) -> None:
        self.id = model_id
        self.created = int(time.time())
        self._status = ModelStatus.LOADING
        self.load_seconds: float | None = None
        self._loader = loader
        self._limits = limits
        self._disabled = disabled_tasks
        self._warmup = warmup
        self._engine: Engine | None = None
        self._loaded: LoadedRunners | None = None
        self._batch_observers: list[BatchObserver] = []

    def observe_batches(self, observer: BatchObserver) -> None:
        """Subscribe (metrics) before loading; the engine built at load time reports to each."""
        self._batch_observers.append(observer)

    def load(self) -> None:
        """Blocking: call from a thread. A failure is kept and reported, not raised."""
        started = time.monotonic()
        try:
            loaded = self._loader()
            if self._warmup:
                warm_up(loaded)
        except Exception:  # a broken checkpoint must still leave /health answering
            # The log alone has the reason: exception text names paths and library internals.
            logger.exception("loading %s failed", self.id)
            self._status = ModelStatus.FAILED
            return
        loaded.capabilities = loaded.capabilities.without(self._disabled)
        self._loaded = loaded
        self._engine = Engine(loaded.runners, self._limits, self._batch_observers)
        self._engine.start()
        self.load_seconds = time.monotonic() - started
        self._status = ModelStatus.READY
        logger.info("%s ready in %.1f s (%s)", self.id, self.load_seconds, loaded.pipeline_class)

    @property
    def status(self) -> ModelStatus:
        """FAILED also once loaded, while its engine is unhealthy (workers keep dying), so
        /health turns 503 and an orchestrator restarts the process."""
        if self._status is ModelStatus.READY and self._engine_problem() is not None:
            return ModelStatus.FAILED
        return self._status

    def _engine_problem(self) -> str | None:
        return self._engine.health_problem if self._engine is not None else None

    def unavailable(self) -> Unavailable:
        """Why the model cannot serve: still loading (retry soon), failed to load or unhealthy (do not)."""
        if (problem := self._engine_problem()) is not None:
            return Unavailable(f"model '{self.id}' is unhealthy: {problem}")
        if self.status is ModelStatus.FAILED:
            return Unavailable(f"model '{self.id}' failed to load; the server's log says why")
        return Unavailable(f"model '{self.id}' is still loading", retry_after=5.0)

    def _ready(self) -> LoadedRunners:
        if self._loaded is None:
            raise self.unavailable()
        return self._loaded

    @property
    def capabilities(self) -> Capabilities:
        return self._ready().capabilities

    @property
    def pipeline_class(self) -> str:
        return self._ready().pipeline_class

    @property
    def engine(self) -> Engine:
        self._ready()
        assert self._engine is not None
        return self._engine

    def drain(self, grace_s: float) -> None:
        """Shutdown begins: queued requests fail now, running ones get ``grace_s`` (see Engine.drain)."""
        if self._engine is not None:
            self._engine.drain(grace_s)

    async def stop(self, grace_s: float) -> None:
        if self._engine is not None:
            await self._engine.stop(grace_s)


def warm_up(loaded: LoadedRunners) -> None:
    """One smallest call per runner, so the first client does not pay for lazy setup."""
    caps = loaded.capabilities
    side = caps.size.min_side
    task = Task.GENERATION if Task.GENERATION in caps.tasks else Task.EDIT
    images = () if task is Task.GENERATION else (Image.new("RGB", (side, side)),)
    job = ImageJob(task=task, prompt="warm-up", width=side, height=side, steps=2, seeds=(0,), images=images,
                   true_cfg_scale=caps.default_true_cfg_scale, negative_prompt=caps.default_negative_prompt,
                   strength=1.0 if "strength" in caps.extras_for(task) else None)
    for runner in loaded.runners:
        runner.run([job], lambda step, total, previews: None)


class ModelRegistry:
    """Model ids to handles. One model today; several later without a redesign."""

    def __init__(self, handles: Sequence[ModelHandle], *, strict_names: bool = False) -> None:
        self._handles = {handle.id: handle for handle in handles}
        self._default = handles[0]
        self._strict = strict_names

    def __iter__(self) -> Iterator[ModelHandle]:
        return iter(self._handles.values())

    def resolve(self, name: str | None) -> ModelHandle:
        if not name:
            return self._default
        if name in self._handles:
            return self._handles[name]
        if not self._strict and name.startswith(OPENAI_MODEL_PREFIXES):
            return self._default
        raise ModelNotFound(
            f"The model '{name}' does not exist. Served models: {', '.join(self._handles)}",
            param="model",
            code="model_not_found",
        )

    def get(self, model_id: str) -> ModelHandle:
        """Exact lookup, for /v1/models/{id}: aliases are not models."""
        if model_id not in self._handles:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return self._handles[model_id]

    async def load_all(self) -> None:
        await asyncio.gather(*(_load_in_own_thread(handle) for handle in self))

    def drain(self, grace_s: float) -> None:
        """The moment shutdown starts, before the server waits for open connections."""
        for handle in self:
            handle.drain(grace_s)

    async def stop(self, grace_s: float) -> None:
        await asyncio.gather(*(handle.stop(grace_s) for handle in self))


async def _load_in_own_thread(handle: ModelHandle) -> None:
    """Load on a thread that ends with the load, not on the loop's long-lived executor.

    A thread that has run torch keeps its OpenMP team while it lives. With that team and a
    worker's both alive, libgomp counts more threads than cores and stops spinning between
    parallel regions: every pipeline call on the worker ran about 2x slower on 2 CPU cores.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"load-{handle.id}")
    try:
        await asyncio.get_running_loop().run_in_executor(pool, handle.load)
    finally:
        pool.shutdown(wait=False)
