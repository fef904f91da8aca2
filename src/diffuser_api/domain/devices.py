"""Accelerator memory as the models layer reports it, so /metrics can show it without torch."""

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
