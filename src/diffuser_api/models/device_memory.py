"""CUDA memory figures for /metrics; ``main`` hands this probe to the app."""

from __future__ import annotations

import torch

from diffuser_api.domain.devices import DeviceMemory


def cuda_memory() -> list[DeviceMemory]:
    """Nothing until CUDA is in use: asking earlier would create a context on every GPU."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [
        DeviceMemory(
            device=f"cuda:{index}",
            allocated_bytes=torch.cuda.memory_allocated(index),
            reserved_bytes=torch.cuda.memory_reserved(index),
            total_bytes=torch.cuda.get_device_properties(index).total_memory,
        )
        for index in range(torch.cuda.device_count())
    ]
