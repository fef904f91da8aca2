"""Which models leave the devices (and how) so that another fits: a pure plan, no waiting.

The registry calls ``plan_room`` with every served model; the plan names the least recently
used models that are neither pinned nor busy, each moved to the warm tier (host RAM) while
``host_memory_budget`` allows, else released. Memory is counted in bytes per device: the
weights and working memory each model measured at its last load.

A model never loaded before has no measurement. It is admitted as if it took nothing, and
once loaded (and measured) the registry plans again with its real size, evicting others if
the device is now over budget: guessing from the checkpoint's file sizes would be wrong both
ways (dtype conversion, offloaded text encoders, working memory), and the measurement is
kept for every later load.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from diffuser_api.models.served import Placement, ServedModel


@dataclass(frozen=True)
class Budgets:
    """From the models file; None: no limit. ``host_bytes`` 0 turns the warm tier off."""

    max_loaded_models: int | None = None
    device_bytes: int | None = None  # per device: weights and working memory
    host_bytes: int | None = None


@dataclass(frozen=True)
class Eviction:
    model: ServedModel
    to_host: bool  # True: offload to the warm tier; False: release the weights


def on_devices(model: ServedModel) -> bool:
    """Takes (or is about to take) room on its devices: loaded, loading, or leaving."""
    return model.placement is Placement.DEVICE or (model.transition is not None and model.transition_loads)


def evictable(model: ServedModel) -> bool:
    return (
        model.placement is Placement.DEVICE
        and model.engine_now is not None
        and model.transition is None
        and not model.pinned
        and not model.busy
    )


def _last_used(model: ServedModel) -> float:
    return model.last_used or 0.0


def _used(models: Iterable[ServedModel], device: str) -> int:
    return sum(model.footprint().get(device, 0) for model in models)


def plan_room(incoming: ServedModel, models: Sequence[ServedModel], budgets: Budgets) -> list[Eviction] | None:
    """Evictions that make room for ``incoming`` (none if it fits), or None if no eviction can.

    A model larger than a device's budget on its own still loads once nothing else is on that
    device: refusing it forever would serve nobody.
    """
    staying = [model for model in models if model is not incoming and on_devices(model)]
    need = incoming.footprint()
    candidates = sorted((model for model in staying if evictable(model)), key=_last_used)

    def over_count() -> bool:
        limit = budgets.max_loaded_models
        return limit is not None and len(staying) + 1 > limit

    def over_devices() -> set[str]:
        if budgets.device_bytes is None:
            return set()
        return {
            device for device in incoming.devices
            if need.get(device, 0) + _used(staying, device) > budgets.device_bytes
            and any(device in model.devices for model in staying)
        }

    victims: list[ServedModel] = []
    while True:
        too_many, crowded = over_count(), over_devices()
        if not too_many and not crowded:
            break
        helps = [model for model in candidates if too_many or any(device in model.devices for device in crowded)]
        if not helps:
            return None
        victim = helps[0]
        candidates.remove(victim)
        staying.remove(victim)
        victims.append(victim)
    return _destinations(incoming, victims, models, budgets)


def _destinations(
    incoming: ServedModel, victims: list[ServedModel], models: Sequence[ServedModel], budgets: Budgets
) -> list[Eviction]:
    """Offload while the warm tier has room, releasing its least recently used models to make
    it; a victim that cannot offload (CPU only) or cannot fit at all is released. An incoming
    model restored from the warm tier still takes its room there until it is back."""
    warm = sorted(
        (model for model in models
         if model.placement is Placement.HOST and model.transition is None and model is not incoming),
        key=_last_used,
    )
    limit = budgets.host_bytes
    kept = incoming.host_bytes
    warm_bytes = sum(model.host_bytes for model in warm)
    plan: list[Eviction] = []
    for victim in victims:
        size = sum(victim.resident_bytes().values())
        if not victim.can_offload or (limit is not None and kept + size > limit):
            plan.append(Eviction(victim, to_host=False))
            continue
        while limit is not None and kept + warm_bytes + size > limit:
            oldest = warm.pop(0)
            warm_bytes -= oldest.host_bytes
            plan.append(Eviction(oldest, to_host=False))
        warm_bytes += size
        plan.append(Eviction(victim, to_host=True))
    return plan
