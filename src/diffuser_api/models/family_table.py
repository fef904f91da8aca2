"""The README's table of families, endpoints and honoured extras, rendered from the code.

Run ``python -m diffuser_api.models.family_table`` and paste the output between the README's
``families`` markers; a test fails when they differ.
"""

from __future__ import annotations

import diffusers

from diffuser_api.domain import Task
from diffuser_api.models.families import FAMILIES
from diffuser_api.models.family import UNIVERSAL_EXTRAS, Family
from diffuser_api.models.tasks import task_classes, task_extras

COLUMNS = (
    ("generations", Task.GENERATION),
    ("edits", Task.EDIT),
    ("edits + mask", Task.MASKED_EDIT),
    ("edits, several images", Task.MULTI_IMAGE_EDIT),
    ("variations", Task.VARIATION),
)
SHORT = {task: heading for heading, task in COLUMNS}
FOOTNOTE = (
    "✓ = served, 501 = `not_supported_error` (diffusers has no pipeline for it). Every family also "
    "honours `num_inference_steps` and `seed`; an extra marked with tasks applies to those only. "
    "`guidance_scale` is refused for checkpoints whose transformer has no guidance embedding "
    "(FLUX.1-schnell). `true_cfg_scale` above 1 needs a `negative_prompt`, and a `negative_prompt` "
    "needs its family's scale (`guidance_scale`, or `true_cfg_scale` where listed) above 1: diffusers "
    "would silently skip either, so both are a 400. Sizes off the multiple are a 400."
)


def _extras(family: Family, extras: dict[Task, frozenset[str]]) -> str:
    names = sorted(frozenset().union(*extras.values()) - UNIVERSAL_EXTRAS)
    cells = []
    for name in names:
        tasks = [task for task in extras if name in extras[task]]
        where = "" if len(tasks) == len(extras) else f" ({', '.join(SHORT[task] for task in tasks)})"
        cells.append(f"`{name}`{where}")
    return ", ".join(cells)


def _defaults(family: Family) -> str:
    parts = [f"{family.default_steps} steps"]
    if family.default_guidance_scale is not None:
        parts.append(f"guidance {family.default_guidance_scale:g}")
    if family.default_true_cfg_scale is not None and family.default_true_cfg_scale > 1:
        parts.append(f"true CFG {family.default_true_cfg_scale:g} (negative {family.default_negative_prompt!r})")
    if family.default_strength is not None:
        parts.append(f"strength {family.default_strength:g}")
    return ", ".join(parts)


def _row(family: Family) -> str:
    classes = task_classes(getattr(diffusers, family.pipeline_classes[0]), family)
    extras = task_extras(classes, family)
    served = ["✓" if task in classes else "501" for _, task in COLUMNS]
    examples = "<br>".join(f"`{example}`" for example in family.examples)
    cells = [f"`{family.name}`", *served, _extras(family, extras), _defaults(family), str(family.size_multiple),
             examples]
    return "| " + " | ".join(cells) + " |"


def render_family_table() -> str:
    header = ["family", *(heading for heading, _ in COLUMNS), "extras", "defaults", "size multiple", "e.g."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(family) for family in FAMILIES]
    return "\n".join(lines) + "\n\n" + FOOTNOTE + "\n"


if __name__ == "__main__":
    print(render_family_table(), end="")
