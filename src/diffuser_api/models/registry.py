"""Served models by id or alias, loaded when asked for and evicted under the budgets.

Every model is known from the start (its spec, and its capabilities from a probe of the
checkpoint), whether or not its weights are loaded. A request holds a *lease* on its model
while it is queued and running: a leased model is never evicted, and a lease on a cold model
loads it (one load shared by every caller). Loading a model that would pass
``max_loaded_models`` or ``memory_budget`` first evicts the least recently used models that
are neither pinned nor busy (see ``residency.py``). No request is ever served by a model other
than the one it named: a model that cannot load in time is a 503.

This module imports no torch: the probe, the loader and the device resolver are injected, so
API tests serve fake models through the real engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import Capabilities, ImageJob, Task
from diffuser_api.engine import Engine, ModelRunner
from diffuser_api.engine.backend import ModelBackend
from diffuser_api.engine.device_turns import DeviceTurns
from diffuser_api.engine.worker import BatchObserver
from diffuser_api.errors import InvalidRequest, ModelNotFound, Unavailable
from diffuser_api.models.residency import Budgets, Eviction, plan_room
from diffuser_api.models.served import LoadedModel, ModelStatus, Placement, ProbedModel, ServedModel
from diffuser_api.models.spec import ModelSpec, PresetSpec, ServingPlan

__all__ = [
    "LoadedModel", "LoadedRunners", "ModelRegistry", "ModelStatus", "ProbedModel", "Route", "ServedModel", "warm_up",
]

logger = logging.getLogger(__name__)

# Names OpenAI clients send by default; they reach the default model unless an entry claims
# them as aliases or names are strict.
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")
# A server shutting down starts no load; the client should retry on another replica.
SHUTDOWN_RETRY_AFTER_S = 1.0
# What a request that found no room (every loaded model busy or pinned) is told to wait.
NO_ROOM_RETRY_AFTER_S = 5.0

T = TypeVar("T")


@dataclass
class LoadedRunners:
    """What ``models.loading.load_model`` returns today: runners and their capabilities."""

    capabilities: Capabilities
    runners: Sequence[ModelRunner]
    pipeline_class: str


@dataclass(frozen=True)
class Route:
    """Where a request's ``model`` name leads: a model, and the preset it named if it named one."""

    model: ServedModel
    preset: PresetSpec | None = None


def warm_up(loaded: LoadedRunners, sizes: int = 1) -> None:
    """Smallest calls per runner, so the first client does not pay for lazy setup. A compiled
    model warms up at two sizes: torch.compile specialises on the first shape it sees and makes
    its graph dynamic at the second, so that recompilation happens here and not to a client."""
    caps = loaded.capabilities
    task = Task.GENERATION if Task.GENERATION in caps.tasks else Task.EDIT
    for index in range(sizes):
        side = caps.size.min_side + index * caps.size.multiple
        images = () if task is Task.GENERATION else (Image.new("RGB", (side, side)),)
        job = ImageJob(task=task, prompt="warm-up", width=side, height=side, steps=2, seeds=(0,), images=images,
                       true_cfg_scale=caps.default_true_cfg_scale, negative_prompt=caps.default_negative_prompt,
                       strength=1.0 if "strength" in caps.extras_for(task) else None)
        for runner in loaded.runners:
            runner.run([job], lambda step, total, previews: None)


def resolve_device(device: str) -> str:
    """``auto`` is CUDA where torch sees it, else the CPU; torch is asked only for ``auto``."""
    if device != "auto":
        return device
    from diffuser_api.models.loading import resolve_devices  # imports torch

    return resolve_devices((device,))[0]


class ModelRegistry:
    def __init__(
        self,
        plan: ServingPlan,
        *,
        probe: Callable[[ModelSpec], ProbedModel],
        loader: Callable[[ModelSpec], LoadedModel],
        strict_names: bool = False,
        device_of: Callable[[str], str] = resolve_device,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Probes every model now (capabilities without weights); a model whose checkpoint
        cannot be read is served as failed, its reason logged. ``clock`` times the back-off
        of failed loads."""
        self._loader = loader
        self._strict = strict_names
        self._clock = clock
        self._budgets = Budgets(plan.max_loaded_models, plan.memory_budget_bytes, plan.host_memory_budget_bytes)
        self._models = {
            spec.id: self._new_model(spec, _probe_in_own_thread(probe, spec), tuple(device_of(d) for d in spec.devices))
            for spec in plan.models
        }
        self._aliases = {alias: spec.id for spec in plan.models for alias in spec.aliases}
        self._presets = {preset.id: preset for preset in plan.presets}
        for preset in plan.presets:
            _check_preset_size(preset, self._models[preset.model])
        self.default = self._models[plan.default]
        self._turns = DeviceTurns()
        self._residency = asyncio.Lock()  # one eviction plan at a time
        self._change = asyncio.Event()  # set (and replaced) whenever a model may have made room
        self._tasks: set[asyncio.Future[None]] = set()  # admin loads and unloads under way
        self._draining = False

    def _new_model(self, spec: ModelSpec, probed: ProbedModel | None, devices: tuple[str, ...]) -> ServedModel:
        """One served model's state; a registry whose models run elsewhere keeps other state."""
        return ServedModel(spec, probed, devices)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    # -- names ---------------------------------------------------------------------------

    def resolve(self, name: str | None, allowed: frozenset[str] | None = None) -> ServedModel:
        """A request's ``model`` (id, alias or preset; none: the default). ``allowed`` (a key's
        model and preset ids) hides every other model: it answers as if it did not exist."""
        return self.route(name, allowed).model

    def route(self, name: str | None, allowed: frozenset[str] | None = None) -> Route:
        """As ``resolve``, keeping the preset a name chose. A key that may use a model may use its
        presets; a key that lists a preset may use that preset, not its model bare."""
        if name in self._presets:
            preset = self._presets[name]
            if allowed is None or preset.id in allowed or preset.model in allowed:
                return Route(self._models[preset.model], preset)
            raise self._not_found(f"The model '{name}' does not exist", allowed)
        model = self._lookup(name)
        if model is None or (allowed is not None and model.id not in allowed):
            named = f"The model '{name}' does not exist" if name else "The default model is not available to you"
            raise self._not_found(named, allowed)
        return Route(model)

    def presets(self, allowed: frozenset[str] | None = None) -> list[Route]:
        """The presets a caller may use (see ``route``), in models-file order."""
        return [
            Route(self._models[preset.model], preset) for preset in self._presets.values()
            if allowed is None or preset.id in allowed or preset.model in allowed
        ]

    def preset(self, preset_id: str, allowed: frozenset[str] | None = None) -> Route | None:
        """Exact lookup of a preset, for /v1/models/{id}; None if there is none the caller may use."""
        return next((route for route in self.presets(allowed) if route.preset and route.preset.id == preset_id), None)

    def get(self, model_id: str, allowed: frozenset[str] | None = None) -> ServedModel:
        """Exact lookup, for /v1/models/{id}: aliases are not models."""
        model = self._models.get(model_id)
        if model is None or (allowed is not None and model_id not in allowed):
            raise self._not_found(f"The model '{model_id}' does not exist", allowed)
        return model

    def _not_found(self, named: str, allowed: frozenset[str] | None) -> ModelNotFound:
        """Names the served ids the caller may use, and no others."""
        served = [model_id for model_id in self._models if allowed is None or model_id in allowed]
        served += [route.preset.id for route in self.presets(allowed) if route.preset is not None]
        return ModelNotFound(f"{named}. Served models: {', '.join(served) or 'none'}", param="model",
                             code="model_not_found")

    def ids_for(self, names: Iterable[str]) -> frozenset[str]:
        """Ids and aliases (a keys file's) as model ids, preset ids as themselves; an unknown name
        is a ValueError."""
        ids = set()
        for name in names:
            if name in self._presets:
                ids.add(name)
                continue
            model = self._lookup(name)
            if model is None:
                raise ValueError(f"unknown model '{name}'; served models: {', '.join(self._models)}")
            ids.add(model.id)
        return frozenset(ids)

    def _lookup(self, name: str | None) -> ServedModel | None:
        if not name:
            return self.default
        if name in self._models:
            return self._models[name]
        if name in self._aliases:
            return self._models[self._aliases[name]]
        if not self._strict and name.startswith(OPENAI_MODEL_PREFIXES):
            return self.default
        return None

    # -- leases ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, model: ServedModel, *, deadline: float, on_loading: Callable[[], None] | None = None
    ) -> AsyncIterator[ModelBackend]:
        """The model's engine, loaded if need be, held for the block (see the module docstring).

        Waits for a load or for room until ``deadline`` (``time.monotonic``), then raises
        ``Unavailable`` (503 with Retry-After). ``on_loading`` is called once if this caller
        has to wait for a load. A failed load raises ``Unavailable`` naming the model.
        """
        model.leases += 1
        try:
            yield await self._engine_for(model, deadline, on_loading)
        finally:
            model.leases -= 1
            model.last_used = time.time()
            self._changed()

    def check_room(self, model: ServedModel) -> None:
        """Raise now, for a loaded model, the 429 or 503 its engine would give new work."""
        if model.engine_now is not None:
            model.engine_now.check_room()

    async def _engine_for(
        self, model: ServedModel, deadline: float, on_loading: Callable[[], None] | None
    ) -> Engine:
        told = False
        while True:
            if self._draining:
                raise Unavailable("the server is shutting down", retry_after=SHUTDOWN_RETRY_AFTER_S)
            if (engine := model.engine_now) is not None:  # unhealthy or not: a replacement worker may serve
                model.last_used = time.time()
                return engine
            if not model.probed:
                raise model.unavailable()
            if model.transition is None and (wait_s := model.retry_after_s(self._clock())) is not None:
                raise Unavailable(model.unavailable().message, retry_after=wait_s)
            if not told and on_loading is not None:
                on_loading()
            told = True
            if model.transition is not None:
                await self._until(model.transition, deadline, model.unavailable)
            else:
                await self._make_room_and_load(model, deadline)

    async def _make_room_and_load(self, model: ServedModel, deadline: float) -> None:
        """Start the model's load once room is made; or wait for a change (a lease ending, an
        eviction done) when nothing can be evicted now."""
        async with self._residency:
            if model.transition is not None or model.engine_now is not None:
                return  # another caller got there first
            plan = plan_room(model, list(self), self._budgets)
            if plan is not None:
                self._begin_load(model, after=[self._evict(eviction) for eviction in plan])
                return
            change = self._change
        await self._until(change.wait(), deadline, lambda: self._no_room(model))

    def _no_room(self, model: ServedModel) -> Unavailable:
        busy = [other.id for other in self if other is not model and other.engine_now is not None]
        return Unavailable(
            f"model '{model.id}' cannot be loaded now: the loaded models ({', '.join(busy)}) are busy or pinned; "
            "retry later",
            retry_after=NO_ROOM_RETRY_AFTER_S,
        )

    @staticmethod
    async def _until(awaitable: Awaitable, deadline: float, too_late: Callable[[], Unavailable]) -> None:
        """Wait (not cancelling a shared load) until ``deadline``, then raise ``too_late()``."""
        future = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            error = too_late()
            raise Unavailable(error.message, retry_after=error.retry_after or NO_ROOM_RETRY_AFTER_S) from None

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    # -- loads and evictions ------------------------------------------------------------------

    def _begin_load(self, model: ServedModel, after: Sequence[asyncio.Future[None]] = ()) -> None:
        """Counted on its devices from now on; loads once the evictions ``after`` are done."""
        model.transition_loads = True
        model.transition = asyncio.ensure_future(self._load(model, after))

    async def _load(self, model: ServedModel, after: Sequence[asyncio.Future[None]]) -> None:
        """Load (or restore from the warm tier) on a thread of its own; never raises."""
        await asyncio.gather(*after, return_exceptions=True)
        started = time.monotonic()
        warm = model.placement is Placement.HOST and model.loaded is not None
        try:
            if warm:
                assert model.loaded is not None
                await _in_own_thread(model.loaded.restore, f"restore-{model.id}")
            else:
                model.loaded = await _in_own_thread(lambda: self._loader(model.spec), f"load-{model.id}")
            loaded = model.loaded
            resident, working = await _in_own_thread(
                lambda: (loaded.resident_bytes(), loaded.working_bytes()), f"measure-{model.id}"
            )
        except Exception:  # a broken checkpoint must leave the other models serving
            # The log alone has the reason: exception text names paths and library internals.
            logger.exception("loading %s failed", model.id)
            await self._drop(model)
            model.note_failure(self._clock())
            return
        finally:
            model.transition = None
            model.transition_loads = False
            self._changed()
        model.placement = Placement.DEVICE
        model.host_bytes = 0
        model.resident_measured = resident
        model.measured = {device: resident.get(device, 0) + working.get(device, 0)
                          for device in {*resident, *working}}
        model.engine_now = Engine(loaded.runners, model.spec.engine, model.observers, self._turns)
        model.engine_now.start()
        model.failures = 0
        model.loads += 1
        model.load_seconds = time.monotonic() - started
        logger.info("%s ready in %.1f s (%s, %s)", model.id, model.load_seconds, loaded.pipeline_class,
                    "from host memory" if warm else "loaded")
        await self._fit_after_load(model)

    async def _fit_after_load(self, model: ServedModel) -> None:
        """A first load was admitted unmeasured: now measured, evict others if it overfilled."""
        async with self._residency:
            plan = plan_room(model, list(self), self._budgets)
            if plan is None:
                logger.warning("%s leaves its devices over the memory budget: nothing can be evicted", model.id)
                return
            evictions = [self._evict(eviction) for eviction in plan]
        for eviction in evictions:
            await asyncio.shield(eviction)

    def _evict(self, eviction: Eviction) -> asyncio.Future[None]:
        """Take the model out of service now (synchronously: no lease can take it after the
        plan chose it) and move its weights in the background."""
        model = eviction.model
        engine, model.engine_now = model.engine_now, None
        model.transition_loads = False
        model.transition = asyncio.ensure_future(self._move_out(model, engine, eviction.to_host))
        return model.transition

    async def _move_out(self, model: ServedModel, engine: Engine | None, to_host: bool) -> None:
        try:
            if engine is not None:
                await engine.stop(grace_s=0.0)  # idle: nothing is queued or running
            if to_host and model.loaded is not None:
                try:
                    await _in_own_thread(model.loaded.offload, f"offload-{model.id}")
                except Exception:
                    logger.exception("moving %s to host memory failed; releasing it", model.id)
                else:
                    model.placement = Placement.HOST
                    model.host_bytes = sum(model.resident_measured.values())
                    model.evictions["host"] += 1
                    logger.info("%s moved to host memory", model.id)
                    return
            await self._drop(model)
            model.evictions["released"] += 1
            logger.info("%s released", model.id)
        finally:
            model.transition = None
            self._changed()

    async def _drop(self, model: ServedModel) -> None:
        loaded, model.loaded = model.loaded, None
        model.placement = Placement.NOWHERE
        model.host_bytes = 0
        if loaded is not None:
            try:
                await _in_own_thread(loaded.release, f"release-{model.id}")
            except Exception:
                logger.exception("releasing %s failed", model.id)

    # -- admin, start and stop -----------------------------------------------------------------

    def start_load(self, model_id: str) -> bool:
        """Admin: load now (past any back-off). True: a load started or is under way; False:
        already loaded."""
        model = self.get(model_id)
        if model.engine_now is not None:
            return False
        if model.transition is None or not model.transition_loads:
            model.retry_at = 0.0
            self._background(self._admin_load(model))
        return True

    async def _admin_load(self, model: ServedModel) -> None:
        deadline = time.monotonic() + model.spec.engine.request_timeout_s
        try:
            async with self.lease(model, deadline=deadline):
                pass
        except Unavailable as error:
            logger.warning("loading %s on request failed: %s", model.id, error.message)

    def start_unload(self, model_id: str) -> bool:
        """Admin: release the model's weights, once its running requests are done. True: started;
        False: nothing to do (not loaded, or only in host memory)."""
        model = self.get(model_id)
        if model.engine_now is None and not (model.transition is not None and model.transition_loads):
            return False
        self._background(self._unload_when_idle(model))
        return True

    async def _unload_when_idle(self, model: ServedModel) -> None:
        while True:
            if model.transition is not None:
                await asyncio.shield(model.transition)
                continue
            if model.engine_now is None:
                return
            if not model.busy:
                await asyncio.shield(self._evict(Eviction(model, to_host=False)))
                return
            change = self._change
            # A running batch ends without a lease change only past its lease; poll as well.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), 0.1)

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Load the pinned models, or the default one when none is pinned."""
        wanted = [model for model in self if model.pinned] or [self.default]
        for model in wanted:
            if model.probed and model.engine_now is None and model.transition is None:
                self._begin_load(model)
        await asyncio.gather(*(asyncio.shield(model.transition) for model in wanted if model.transition))

    def health_problem(self) -> Unavailable | None:
        """Why the server should not be called ready: a pinned (or the default) model that is
        not, or any loaded model whose workers keep dying (a restart is due)."""
        for model in self:
            if model.engine_now is not None and model.engine_now.health_problem is not None:
                return model.unavailable()
        for model in [model for model in self if model.pinned] or [self.default]:
            if model.status is not ModelStatus.READY:
                return model.unavailable()
        return None

    def observe_batches(self, make_observer: Callable[[str], BatchObserver]) -> None:
        """Subscribe (metrics) once; every engine a model gets from then on reports to it."""
        for model in self:
            model.observers.append(make_observer(model.id))

    @property
    def draining(self) -> bool:
        """Shutdown has begun: work that fails now failed for that reason (async jobs go back
        to their queue rather than failing)."""
        return self._draining

    def drain(self, grace_s: float) -> None:
        """Shutdown begins: no load starts, queued requests fail now, running ones get the grace."""
        self._draining = True
        self._changed()
        for model in self:
            if model.engine_now is not None:
                model.engine_now.drain(grace_s)

    async def stop(self, grace_s: float) -> None:
        self.drain(grace_s)
        for task in list(self._tasks):
            task.cancel()
        transitions = [model.transition for model in self if model.transition is not None]
        await asyncio.gather(*transitions, return_exceptions=True)
        await asyncio.gather(*(model.engine_now.stop(grace_s) for model in self if model.engine_now is not None))


def _check_preset_size(preset: PresetSpec, model: ServedModel) -> None:
    """A preset's default size must be one its model takes: a bad file stops the start."""
    if preset.defaults.size is None or not model.probed:
        return
    width, height = preset.defaults.size
    try:
        model.capabilities.size.check(width, height, requested=f"{width}x{height}", owner=f"model '{model.id}'")
    except InvalidRequest as error:
        raise ModelsFileError(f"preset '{preset.id}': defaults.{error.message}") from None


async def _in_own_thread(work: Callable[[], T], name: str) -> T:
    """Run on a thread that ends with the work, not on the loop's long-lived executor.

    A thread that has run torch keeps its OpenMP team while it lives. With that team and a
    worker's both alive, libgomp counts more threads than cores and stops spinning between
    parallel regions: every pipeline call on the worker ran about 2x slower on 2 CPU cores.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, work)
    finally:
        pool.shutdown(wait=False)


def _probe_in_own_thread(probe: Callable[[ModelSpec], ProbedModel], spec: ModelSpec) -> ProbedModel | None:
    """The probe may build a tiny model (torch): on a thread of its own, like loads."""
    result: list[ProbedModel] = []

    def run() -> None:
        try:
            result.append(probe(spec))
        except Exception:  # one unreadable checkpoint must leave the others serving
            logger.exception("reading the checkpoint of %s failed", spec.id)

    thread = threading.Thread(target=run, name=f"probe-{spec.id}")
    thread.start()
    thread.join()
    return result[0] if result else None
