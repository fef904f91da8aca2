"""Qwen-Image-Edit pipelines work at the requested output area, not a fixed 1 MPix.

In diffusers 0.42 ``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline`` and
``QwenImageEditInpaintPipeline`` call their module-level ``calculate_dimensions(1024 * 1024,
ratio)`` inside ``__call__`` to size the input image for the VAE (and the inpaint pipeline its
output, ignoring ``height``/``width``). No argument changes it. That costs seconds and ~1 GB
per call on small outputs, and makes masked edits ignore the requested size.

``working_area(area)`` replaces that 1 MPix target with ``area`` for the calls made inside
it, on this thread only (a ``ContextVar``; other threads and other targets, such as Plus's
384x384 vision-encoder size, are untouched). The wrapper is installed once, at import.
Remove this module once diffusers takes the area as an argument.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from diffusers.pipelines.qwenimage import (
    pipeline_qwenimage_edit,
    pipeline_qwenimage_edit_inpaint,
    pipeline_qwenimage_edit_plus,
)

PIPELINE_AREA = 1024 * 1024  # the target the pipelines hard-code
_area: contextvars.ContextVar[int | None] = contextvars.ContextVar("qwen_working_area", default=None)


def _wrap(calculate_dimensions):
    def calculate_at_working_area(target_area, ratio):
        area = _area.get()
        return calculate_dimensions(area if area is not None and target_area == PIPELINE_AREA else target_area, ratio)

    calculate_at_working_area.wraps_working_area = True
    return calculate_at_working_area


for _module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, pipeline_qwenimage_edit_inpaint):
    if not getattr(_module.calculate_dimensions, "wraps_working_area", False):
        _module.calculate_dimensions = _wrap(_module.calculate_dimensions)


@contextlib.contextmanager
def working_area(area: int) -> Iterator[None]:
    token = _area.set(area)
    try:
        yield
    finally:
        _area.reset(token)
