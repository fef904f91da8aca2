"""``speed.compile``: regional ``torch.compile`` of the denoiser, the part every step runs.

Compiling only the repeated blocks (diffusers' ``compile_repeated_blocks``) compiles one block
and reuses it for its siblings: seconds instead of minutes, nearly the whole speed-up. A
denoiser without ``_repeated_blocks`` is compiled whole. Shapes are dynamic, so a new size
reuses the compiled code instead of stalling its worker on a recompile. Compilation itself is
lazy: the warm-up call pays for it, before the model serves anyone.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def compile_denoiser(pipeline: Any) -> str:
    """Compile the pipeline's transformer or UNet in place; returns what was compiled."""
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(dynamic=True)
        what = f"repeated blocks {', '.join(denoiser._repeated_blocks)}"
    else:
        denoiser.compile(dynamic=True)
        what = f"whole {type(denoiser).__name__}"
    logger.info("compiling %s (%s) during warm-up", type(denoiser).__name__, what)
    return what
