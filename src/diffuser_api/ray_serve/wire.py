"""What crosses Ray's object store between the ingress and a model replica: plain dicts of
numbers, strings and numpy arrays, never pickled PIL images or exceptions.

Arrays go through the object store without a copy and without a codec (a lossless PNG encode
of every step's preview would cost more than the step on a small model). Errors cross as our
error's kind and fields, so the ingress raises the same ``DiffuserError`` the replica did and
a Ray traceback never reaches a client.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
from PIL import Image

from diffuser_api import errors
from diffuser_api.domain import GeneratedImage, ImageJob, StepProgress, Task
from diffuser_api.domain.timeline import Phase
from diffuser_api.engine.job import JobTiming
from diffuser_api.engine.priority import Priority
from diffuser_api.engine.worker import BatchReport

Message = dict[str, Any]

_PLAIN_JOB_FIELDS = tuple(field.name for field in fields(ImageJob) if field.name not in ("task", "images", "mask"))
# Our errors a replica may raise, by name; anything else is a model failure.
_ERROR_KINDS: dict[str, type[errors.DiffuserError]] = {
    kind.__name__: kind
    for kind in (
        errors.InvalidRequest, errors.NotSupported, errors.Overloaded, errors.Unavailable, errors.ModelFailure,
        errors.OutOfMemory, errors.RequestTimeout, errors.Cancelled, errors.PayloadTooLarge,
    )
}


def image_to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def array_to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


def job_to_wire(job: ImageJob, remaining_s: float, priority: Priority = Priority.INTERACTIVE) -> Message:
    """``remaining_s`` replaces the ingress's monotonic deadline, which means nothing elsewhere;
    ``priority`` travels so that the replica's engine schedules the work in its class."""
    return {
        "task": job.task.value,
        **{name: getattr(job, name) for name in _PLAIN_JOB_FIELDS},
        "images": [image_to_array(image) for image in job.images],
        "mask": None if job.mask is None else image_to_array(job.mask),
        "remaining_s": remaining_s,
        "priority": int(priority),
    }


def job_from_wire(message: Message) -> ImageJob:
    return ImageJob(
        task=Task(message["task"]),
        **{name: message[name] for name in _PLAIN_JOB_FIELDS},
        images=tuple(array_to_image(array) for array in message["images"]),
        mask=None if message["mask"] is None else array_to_image(message["mask"]),
    )


def progress_to_wire(progress: StepProgress) -> Message:
    previews = None if progress.previews is None else [image_to_array(image) for image in progress.previews]
    return {"step": progress.step, "total": progress.total, "first_image": progress.first_image, "previews": previews}


def progress_from_wire(message: Message) -> StepProgress:
    previews = message["previews"]
    return StepProgress(
        step=message["step"],
        total=message["total"],
        first_image=message["first_image"],
        previews=None if previews is None else tuple(array_to_image(array) for array in previews),
    )


def images_to_wire(images: list[GeneratedImage]) -> list[Message]:
    return [
        {"image": image_to_array(image.image), "seed": image.seed, "revised_prompt": image.revised_prompt,
         "prompt_tokens": image.prompt_tokens}
        for image in images
    ]


def images_from_wire(messages: list[Message]) -> list[GeneratedImage]:
    return [
        GeneratedImage(image=array_to_image(message["image"]), seed=message["seed"],
                       revised_prompt=message["revised_prompt"], prompt_tokens=message["prompt_tokens"])
        for message in messages
    ]


def error_to_wire(error: errors.DiffuserError) -> Message:
    kind = type(error).__name__ if type(error).__name__ in _ERROR_KINDS else errors.ModelFailure.__name__
    return {"kind": kind, "message": error.message, "param": error.param, "code": error.code,
            "retry_after": getattr(error, "retry_after", None)}


def error_from_wire(message: Message) -> errors.DiffuserError:
    kind = _ERROR_KINDS.get(message["kind"], errors.ModelFailure)
    if issubclass(kind, errors.Overloaded):
        return kind(message["message"], retry_after=message["retry_after"] or 1.0)
    if issubclass(kind, errors.Unavailable):
        return kind(message["message"], retry_after=message["retry_after"])
    return kind(message["message"], param=message["param"], code=message["code"])


def timing_to_wire(timing: JobTiming) -> Message:
    return {
        "queue_wait_s": timing.queue_wait_s,
        "compute_s": timing.compute_s,
        "phases": [(phase.name, phase.start_ns, phase.end_ns) for phase in timing.phases],
    }


def timing_from_wire(message: Message, into: JobTiming) -> None:
    into.queue_wait_s = message["queue_wait_s"]
    into.compute_s = message["compute_s"]
    into.phases = tuple(Phase(name, start_ns, end_ns) for name, start_ns, end_ns in message["phases"])


def report_to_wire(report: BatchReport) -> Message:
    return {"worker": report.worker, "size": report.size, "queue_wait_s": list(report.queue_wait_s),
            "compute_s": report.compute_s, "steps": report.steps, "outcome": report.outcome}


def report_from_wire(message: Message) -> BatchReport:
    return BatchReport.of_figures(**message)
