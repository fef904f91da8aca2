"""One served model: its spec and capabilities (always there) and, while loaded, its weights
and engine. The registry (``registry.py``) decides when a model loads and leaves; this object
holds the state and says what it is. Imports no torch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

from diffuser_api.domain import Capabilities
from diffuser_api.engine import Engine, ModelRunner
from diffuser_api.engine.worker import BatchObserver
from diffuser_api.errors import Unavailable
from diffuser_api.models.spec import ModelSpec

# A model that failed to load is tried again by a later request only after this back-off,
# doubled with each failure in a row up to the maximum: a broken checkpoint is not read
# from disk for every request, and a passing fault (a full disk, a busy hub) heals itself.
FIRST_RETRY_S = 2.0
MAX_RETRY_S = 300.0
# What a client that finds the model loading is told to wait before asking again.
LOADING_RETRY_AFTER_S = 5.0


class ModelStatus(StrEnum):
    READY = "ready"
    LOADING = "loading"
    OFFLOADED = "offloaded"  # weights in host RAM (the warm tier): a quick reload
    UNLOADED = "unloaded"
    FAILED = "failed"


class LoadedModel(Protocol):
    """A model's weights, placed on its devices by a loader (``models/loading.py`` for diffusers)."""

    runners: Sequence[ModelRunner]
    pipeline_class: str
    can_offload: bool  # False when every device is the CPU: the warm tier would be the same RAM

    def resident_bytes(self) -> dict[str, int]:
        """Device -> bytes of parameters and buffers on it now."""
        ...

    def working_bytes(self) -> dict[str, int]:
        """Device -> peak memory beyond the weights, measured during warm-up (0 where unknown)."""
        ...

    def adapter_bytes(self) -> dict[str, int]:
        """Device -> bytes of the LoRA adapters loaded now (they come and go while serving)."""
        ...

    def loaded_adapters(self) -> tuple[str, ...]:
        """Names of the LoRA adapters loaded now."""
        ...

    def offload(self) -> None:
        """Move the weights to host RAM (blocking)."""
        ...

    def restore(self) -> None:
        """Move offloaded weights back to their devices (blocking)."""
        ...

    def release(self) -> None:
        """Drop the weights and whatever memory they held (blocking)."""
        ...


@dataclass(frozen=True)
class ProbedModel:
    """What a checkpoint can do, read without loading its weights."""

    capabilities: Capabilities
    pipeline_class: str


class Placement(Enum):
    """Where a model's weights are, whatever is happening to them."""

    NOWHERE = "nowhere"
    DEVICE = "device"
    HOST = "host"


class ServedModel:
    """One per spec, for the server's whole life; see the module docstring."""

    def __init__(self, spec: ModelSpec, probed: ProbedModel | None, devices: tuple[str, ...]) -> None:
        """``probed`` is None when the checkpoint could not be read: the model stays failed."""
        self.spec = spec
        self.id = spec.id
        self.created = int(time.time())
        self.devices = devices
        self._probed = probed
        self.load_seconds: float | None = None
        self.last_used: float | None = None
        self.loads = 0
        self.evictions = {"host": 0, "released": 0}
        self.loaded: LoadedModel | None = None
        self.placement = Placement.NOWHERE
        self.engine_now: Engine | None = None  # set exactly while the model is ready to serve
        self.transition: asyncio.Future[None] | None = None  # a load, restore or eviction under way
        self.transition_loads = False  # whether ``transition`` brings the model in (vs takes it out)
        self.leases = 0
        self.failures = 0  # failed loads in a row
        self.retry_at = 0.0  # time.monotonic() before which a failed load is not tried again
        self.resident_measured: dict[str, int] = {}  # device -> weights, at the last load
        self.measured: dict[str, int] = {}  # device -> weights + working memory, at the last load
        self.host_bytes = 0  # bytes in the warm tier while offloaded
        self.observers: list[BatchObserver] = []

    @property
    def capabilities(self) -> Capabilities:
        """From the checkpoint, known before any load (per-model defaults folded in)."""
        return self._probe().capabilities

    @property
    def pipeline_class(self) -> str:
        return self._probe().pipeline_class

    def _probe(self) -> ProbedModel:
        if self._probed is None:
            raise self.unavailable()
        return self._probed

    @property
    def probed(self) -> bool:
        return self._probed is not None

    @property
    def status(self) -> ModelStatus:
        """FAILED also once loaded, while its engine is unhealthy (workers keep dying), so
        /health turns 503 and an orchestrator restarts the process."""
        if self._probed is None:
            return ModelStatus.FAILED
        if self.transition is not None and self.transition_loads:
            return ModelStatus.LOADING
        if self.engine_now is not None:
            return ModelStatus.FAILED if self.engine_now.health_problem is not None else ModelStatus.READY
        if self.placement is Placement.HOST:
            return ModelStatus.OFFLOADED
        if self.failures:
            return ModelStatus.FAILED
        return ModelStatus.UNLOADED

    @property
    def can_offload(self) -> bool:
        return self.loaded is not None and self.loaded.can_offload

    @property
    def pinned(self) -> bool:
        return self.spec.pinned

    @property
    def busy(self) -> bool:
        """A lease held (a request queued or running) or a batch running: never evicted."""
        engine = self.engine_now
        return self.leases > 0 or (engine is not None and any(worker.busy for worker in engine.workers))

    @property
    def engine(self) -> Engine:
        """The engine of a ready model; raises why the model cannot serve otherwise."""
        if self.engine_now is None:
            raise self.unavailable()
        return self.engine_now

    def queue_depth(self) -> int:
        return self.engine_now.queue_depth if self.engine_now is not None else 0

    def resident_bytes(self) -> dict[str, int]:
        """Device -> bytes of weights there, as measured at the last load, plus the LoRA adapters
        loaded now; {} when not loaded."""
        if self.placement is not Placement.DEVICE or self.loaded is None:
            return {}
        return _plus(self.resident_measured, self.adapter_bytes())

    def adapter_bytes(self) -> dict[str, int]:
        """Device -> bytes of the LoRA adapters loaded there now; {} when not on a device."""
        if self.placement is not Placement.DEVICE or self.loaded is None:
            return {}
        return self.loaded.adapter_bytes()

    def loaded_adapters(self) -> tuple[str, ...]:
        return self.loaded.loaded_adapters() if self.loaded is not None else ()

    def footprint(self) -> dict[str, int]:
        """Device -> bytes this model takes (or, not yet loaded, is expected to take): weights and
        working memory as measured at its last load, plus the LoRA adapters it holds now (they
        count in the memory budget); {} before a first load (see registry)."""
        return _plus(self.measured, self.adapter_bytes())

    def unavailable(self) -> Unavailable:
        """Why the model cannot serve now, in our words (the log has the details)."""
        engine = self.engine_now
        if engine is not None and (problem := engine.health_problem) is not None:
            return Unavailable(f"model '{self.id}' is unhealthy: {problem}")
        status = self.status
        if status is ModelStatus.FAILED:
            return Unavailable(f"model '{self.id}' failed to load; the server's log says why")
        if status is ModelStatus.LOADING:
            return Unavailable(f"model '{self.id}' is still loading", retry_after=LOADING_RETRY_AFTER_S)
        return Unavailable(
            f"model '{self.id}' is not loaded ({status.value}); a request for it loads it",
            retry_after=LOADING_RETRY_AFTER_S,
        )

    def note_failure(self, now: float) -> None:
        self.failures += 1
        self.retry_at = now + min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (self.failures - 1))

    def retry_after_s(self, now: float) -> float | None:
        """Seconds until a failed model may be tried again; None if it may be now."""
        if self._probed is None:
            return None
        if self.failures and now < self.retry_at:
            return max(1.0, round(self.retry_at - now, 1))
        return None



def _plus(first: dict[str, int], second: dict[str, int]) -> dict[str, int]:
    return {device: first.get(device, 0) + second.get(device, 0) for device in {*first, *second}}
