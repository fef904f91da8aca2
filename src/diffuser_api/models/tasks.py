"""Which diffusers pipeline class serves each task of a family, and which extras it takes.

Derived from diffusers' own ``AutoPipelineFor*`` mappings and ``__call__`` signatures, so a
task exists exactly where diffusers has a pipeline for it. The loader uses this on the
loaded class; the README's family table uses it on each family's main class.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
    _get_task_class,
)

from diffuser_api.domain import Task
from diffuser_api.models.family import SIGNATURE_EXTRAS, UNIVERSAL_EXTRAS, Family


def takes(pipeline: Any, parameter: str) -> bool:
    """Whether a pipeline (class or instance) takes ``parameter`` in ``__call__``."""
    return parameter in inspect.signature(pipeline.__call__).parameters


def task_classes(pipeline_class: type, family: Family) -> dict[Task, type]:
    classes: dict[Task, type] = {}
    if pipeline_class in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values():
        classes[Task.GENERATION] = pipeline_class
    for task, mapping in (
        (Task.EDIT, AUTO_IMAGE2IMAGE_PIPELINES_MAPPING),
        (Task.MASKED_EDIT, AUTO_INPAINT_PIPELINES_MAPPING),
    ):
        task_class = _get_task_class(mapping, pipeline_class.__name__, throw_error_if_not_exist=False)
        if task_class is not None:
            classes[task] = task_class
    for task, class_name in family.unmapped_task_pipelines:
        classes.setdefault(task, getattr(diffusers, class_name))
    if family.max_input_images > 1 and Task.EDIT in classes:
        classes[Task.MULTI_IMAGE_EDIT] = classes[Task.EDIT]
    # Variations are image-to-image from the input, which needs a strength below 1.
    if Task.EDIT in classes and takes(classes[Task.EDIT], "strength"):
        classes[Task.VARIATION] = classes[Task.EDIT]
    return classes


def task_extras(classes: dict[Task, type], family: Family) -> dict[Task, frozenset[str]]:
    """The extras each task's pipeline honours: those its ``__call__`` takes, less the family's ignored ones."""
    return {
        task: frozenset(UNIVERSAL_EXTRAS | {name for name in SIGNATURE_EXTRAS if takes(cls, name)})
        - family.ignored_extras
        for task, cls in classes.items()
    }
