"""``tiny-flux-kontext``: a FLUX.1 Kontext (image edit) pipeline, same components as ``tiny-flux``.

Kontext rescales its output to ``max_area`` (default 1024**2, whatever ``height``/``width``
say) and, with ``_auto_resize=True`` (default), the input image to a ~1 MPix preferred size.
For small outputs pass ``max_area=height * width`` and ``_auto_resize=False``.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import FluxKontextPipeline

from diffuser_api.models.tiny import flux


def build(folder: Path) -> None:
    FluxKontextPipeline(**flux.components()).save_pretrained(folder)
