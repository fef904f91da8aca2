"""One model whose runners are built by a callable (a benchmark's in-memory pipeline, or a
loader that only knows its capabilities once loaded), served by a registry of one.

Its probe builds the runners (the first load reuses them), so this is for models that are
loaded anyway at start: pinned, never evicted, no warm tier and no byte accounting.
"""

from __future__ import annotations

from collections.abc import Callable

from diffuser_api.engine import EngineLimits
from diffuser_api.models.registry import LoadedRunners, ModelRegistry, ProbedModel
from diffuser_api.models.spec import ModelSpec, ServingPlan


class RunnersModel:
    """``LoadedModel`` over ready runners: nothing measured, nothing to offload."""

    can_offload = False

    def __init__(self, loaded: LoadedRunners) -> None:
        self.runners = loaded.runners
        self.pipeline_class = loaded.pipeline_class

    def resident_bytes(self) -> dict[str, int]:
        return {}

    def working_bytes(self) -> dict[str, int]:
        return {}

    def adapter_bytes(self) -> dict[str, int]:
        return {}

    def loaded_adapters(self) -> tuple[str, ...]:
        return ()

    def offload(self) -> None:
        raise NotImplementedError("an in-memory model has no warm tier")

    def restore(self) -> None:
        raise NotImplementedError("an in-memory model has no warm tier")

    def release(self) -> None:
        self.runners = ()


def registry_of_one(
    spec: ModelSpec, build: Callable[[], LoadedRunners], *, strict_names: bool = False
) -> ModelRegistry:
    """``spec`` pinned; ``build`` runs once for the probe, and again only after a release."""
    built: list[LoadedRunners] = []

    def probe(spec: ModelSpec) -> ProbedModel:
        built.append(build())
        return ProbedModel(built[0].capabilities.without(spec.disabled_tasks), built[0].pipeline_class)

    def loader(spec: ModelSpec) -> RunnersModel:
        return RunnersModel(built.pop() if built else build())

    pinned = ModelSpec(**{**spec.__dict__, "pinned": True})
    return ModelRegistry(ServingPlan(models=(pinned,), default=spec.id), probe=probe, loader=loader,
                         strict_names=strict_names)


def in_memory_spec(model_id: str, device: str, limits: EngineLimits) -> ModelSpec:
    return ModelSpec(id=model_id, source=model_id, devices=(device,), engine=limits, warmup=False)
