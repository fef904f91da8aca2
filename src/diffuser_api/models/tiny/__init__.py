"""Tiny random-weight pipelines, built offline so the server runs with no model hub.

A model id such as ``tiny-sd`` names a builder here. The first time it is asked for, the
pipeline is built with fixed seeds and saved to the cache folder atomically (a temporary
folder renamed into place), so concurrent starts never see a half-written model. It is
then loaded through the same ``from_pretrained`` path as any hub id or local folder.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

# model id -> (module in this package, builder function). Modules are imported only when
# their model is built: importing every family's classes costs seconds at start-up.
BUILDERS: dict[str, tuple[str, str]] = {
    "tiny-sd": ("stable_diffusion", "build"),
    "tiny-sdxl": ("sdxl", "build"),
    "tiny-sd3": ("sd3", "build"),
    "tiny-flux": ("flux", "build"),
    "tiny-flux-kontext": ("flux_kontext", "build"),
    "tiny-qwen-image": ("qwen_image", "build"),
    "tiny-qwen-image-edit": ("qwen_image_edit", "build"),
    "tiny-qwen-image-edit-plus": ("qwen_image_edit", "build_plus"),
}


def _build(model_id: str, folder: Path) -> None:
    module_name, function = BUILDERS[model_id]
    module = importlib.import_module(f"{__name__}.{module_name}")
    getattr(module, function)(folder)


def is_tiny_model(model_id: str) -> bool:
    return model_id in BUILDERS


def ensure_tiny_model(model_id: str, cache_dir: Path) -> Path:
    """Return the folder of a tiny model, building it first if the cache lacks it."""
    target = cache_dir / model_id
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{model_id}-", dir=cache_dir))
    try:
        _build(model_id, scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            # Another process finished first; its copy is identical (fixed seeds).
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
