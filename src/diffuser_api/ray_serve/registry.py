"""The ingress's registry under Ray: models whose replicas Ray runs and scales.

The same names, capabilities and leases as the single process (``models/registry.py``), so
api/ and service/ cannot tell the difference; but memory is Ray's to manage: replicas and
autoscaling take the place of the LRU, a model's status is read from its replica counts, and
the admin load/unload routes set a model's target to at least one replica / to zero (a
request to a model scaled to zero starts a replica again, as a request loads an unloaded
model in one process). Imports no Ray: the replica counts, the scaler and the backends are
injected (``application.py`` gives Ray's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from diffuser_api.engine.backend import ModelBackend
from diffuser_api.engine.worker import BatchObserver
from diffuser_api.errors import Unavailable
from diffuser_api.models.registry import SHUTDOWN_RETRY_AFTER_S, ModelRegistry
from diffuser_api.models.served import LOADING_RETRY_AFTER_S, ModelStatus, ProbedModel, ServedModel
from diffuser_api.models.spec import ModelSpec, ServingPlan

logger = logging.getLogger(__name__)

# How often the replica counts are read from Ray's controller.
REFRESH_S = 1.0


@dataclass(frozen=True)
class ReplicaCounts:
    running: int = 0
    starting: int = 0
    failed: bool = False  # Ray says the deployment is unhealthy or failed to deploy


class RemoteModel(ServedModel):
    """A model whose engine runs in Ray replicas; its status follows their counts."""

    replicas = ReplicaCounts()

    @property
    def status(self) -> ModelStatus:
        if not self.probed:
            return ModelStatus.FAILED
        if self.replicas.running:
            return ModelStatus.READY
        if self.replicas.failed:
            return ModelStatus.FAILED
        return ModelStatus.LOADING if self.replicas.starting else ModelStatus.UNLOADED

    @property
    def busy(self) -> bool:
        return self.leases > 0

    def queue_depth(self) -> int:
        """Requests this ingress has in flight to the model (the replicas' own queues are theirs)."""
        return self.leases

    def unavailable(self) -> Unavailable:
        status = self.status
        if status is ModelStatus.FAILED:
            return Unavailable(f"model '{self.id}' has no healthy replica; the Ray Serve log says why")
        return Unavailable(f"model '{self.id}' has no running replica yet ({status.value}); retry later",
                           retry_after=LOADING_RETRY_AFTER_S)


class RayModelRegistry(ModelRegistry):
    def __init__(
        self,
        plan: ServingPlan,
        *,
        probe: Callable[[ModelSpec], ProbedModel],
        connect: Callable[[ModelSpec, Sequence[BatchObserver]], ModelBackend],
        replica_counts: Callable[[], dict[str, ReplicaCounts]],
        scale: Callable[[ModelSpec, bool], None],
        strict_names: bool = False,
    ) -> None:
        """``connect`` gives a model's backend (told the model's batch observers);
        ``replica_counts`` (blocking) reads every model's counts; ``scale`` (blocking) sets a
        model's target to at least one replica (True) or to zero (False)."""
        super().__init__(plan, probe=probe, loader=_no_local_loads, strict_names=strict_names,
                         device_of=lambda device: device)
        self._backends = {model.id: connect(model.spec, model.observers) for model in self}
        self._replica_counts = replica_counts
        self._scale = scale

    def _new_model(self, spec: ModelSpec, probed: ProbedModel | None, devices: tuple[str, ...]) -> ServedModel:
        return RemoteModel(spec, probed, devices)

    @contextlib.asynccontextmanager
    async def lease(
        self, model: ServedModel, *, deadline: float, on_loading: Callable[[], None] | None = None
    ) -> AsyncIterator[ModelBackend]:
        """The model's deployment; a model at zero replicas is started by the request itself
        (Ray's autoscaler sees it waiting), and ``on_loading`` says so."""
        if self._draining:
            raise Unavailable("the server is shutting down", retry_after=SHUTDOWN_RETRY_AFTER_S)
        if not model.probed or model.status is ModelStatus.FAILED:
            raise model.unavailable()
        if model.status is not ModelStatus.READY and on_loading is not None:
            on_loading()
        model.leases += 1
        try:
            yield self._backends[model.id]
        finally:
            model.leases -= 1
            model.last_used = time.time()

    async def start(self) -> None:
        """Read the replica counts now and then every ``REFRESH_S``."""
        await self._refresh()
        self._background(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            counts = await asyncio.to_thread(self._replica_counts)
        except Exception:  # the controller restarting must not end the refresh loop
            logger.exception("reading the replica counts from Ray Serve failed")
            return
        for model in self:
            assert isinstance(model, RemoteModel)
            model.replicas = counts.get(model.id, ReplicaCounts())

    def start_load(self, model_id: str) -> bool:
        """Admin: at least one replica from now on. False: the model already has one."""
        model = self.get(model_id)
        if model.status is ModelStatus.READY:
            return False
        self._background(self._scaled(model.spec, up=True))
        return True

    def start_unload(self, model_id: str) -> bool:
        """Admin: scale to zero once idle. False: the model has no replica."""
        model = self.get(model_id)
        if model.status in (ModelStatus.UNLOADED, ModelStatus.FAILED):
            return False
        self._background(self._scaled(model.spec, up=False))
        return True

    async def _scaled(self, spec: ModelSpec, *, up: bool) -> None:
        try:
            await asyncio.to_thread(self._scale, spec, up)
        except Exception:  # an admin call's failure is logged; the models keep serving
            logger.exception("setting the replicas of %s failed", spec.id)

    def health_problem(self) -> Unavailable | None:
        """Not ready while the default (or a pinned) model has no running replica, unless it
        autoscales from zero: a request will start one."""
        for model in [model for model in self if model.pinned] or [self.default]:
            status = model.status
            scales_from_zero = (model.spec.ray.autoscaling_config or {}).get("min_replicas", 1) == 0
            if status is not ModelStatus.READY and not (status is ModelStatus.UNLOADED and scales_from_zero):
                return model.unavailable()
        return None


def _no_local_loads(spec: ModelSpec) -> None:
    raise AssertionError(f"model '{spec.id}' runs in Ray replicas; the ingress never loads it")
