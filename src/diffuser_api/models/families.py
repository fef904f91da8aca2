"""Every known family, and how a loaded pipeline's class picks one."""

from __future__ import annotations

from diffuser_api.errors import NotSupported
from diffuser_api.models import (
    flux,
    flux_kontext,
    qwen_image,
    qwen_image_edit,
    qwen_image_edit_plus,
    sd3,
    sdxl,
    stable_diffusion,
)
from diffuser_api.models.family import Family

FAMILIES: tuple[Family, ...] = (
    stable_diffusion.FAMILY,
    sdxl.FAMILY,
    sd3.FAMILY,
    flux.FAMILY,
    flux_kontext.FAMILY,
    qwen_image.FAMILY,
    qwen_image_edit.FAMILY,
    qwen_image_edit_plus.FAMILY,
)


def family_for(pipeline_class: str, override: str | None = None) -> Family:
    """Find the family by ``model_index.json``'s class name, or by the name a setting forces."""
    for family in FAMILIES:
        if family.name == override or (override is None and pipeline_class in family.pipeline_classes):
            return family
    known = ", ".join(family.name for family in FAMILIES)
    wanted = f"family '{override}'" if override else f"pipeline class {pipeline_class}"
    raise NotSupported(f"no model family serves {wanted}; known families: {known}")
