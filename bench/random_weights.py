"""Building real-size random-weight models straight on an accelerator, for the GPU scripts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def created_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are born on ``device`` in ``dtype``: no host copy, no float32 detour."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)
