"""Device names and accelerator memory as the models layer reports it, so the service and
/metrics can use them without torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceMemory:
    device: str
    allocated_bytes: int
    reserved_bytes: int
    total_bytes: int


DeviceMemoryProbe = Callable[[], Sequence[DeviceMemory]]


def is_cpu(device: str) -> bool:
    """A CPU device as the loader names devices ("cpu", "cpu:0"): its pipeline threads hold
    the host's cores, which the service and the runners plan around."""
    return device.startswith("cpu")
