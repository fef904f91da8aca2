"""Out of device memory: the client hears it in our words; the allocator's report is logged."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from diffuser_api.domain import Task
from diffuser_api.domain.capabilities import PreviewPlan
from diffuser_api.errors import OutOfMemory
from diffuser_api.models.families import family_for
from diffuser_api.models.preview_modes import preview_decoder
from diffuser_api.models.runner import DiffusersRunner
from tests.fakes import image_job

# What torch's caching allocator says, abridged: sizes, process ids, tuning advice.
ALLOCATOR_REPORT = (
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
    "1.20 GiB is free. Process 48213 has 77.94 GiB memory in use. Of the allocated memory 75.10 GiB is "
    "allocated by PyTorch. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


class OutOfMemoryPipeline:
    """Takes what a text-to-image pipeline takes, and runs out of memory like one."""

    def __call__(self, prompt: Any = None, height: int | None = None, width: int | None = None, **kwargs: Any):
        raise torch.OutOfMemoryError(ALLOCATOR_REPORT)


def test_out_of_memory_message_is_ours_and_the_report_goes_to_the_log(caplog):
    family = family_for("StableDiffusionPipeline")
    never_previewed = preview_decoder(family, PreviewPlan("vae", "unused"), 1.0)
    runner = DiffusersRunner("cuda:0", family, {Task.GENERATION: OutOfMemoryPipeline()}, never_previewed)
    with caplog.at_level(logging.WARNING), pytest.raises(OutOfMemory) as raised:
        runner.run([image_job("x", seeds=(1, 2))], lambda step, total, previews: None)
    message = raised.value.message
    assert "out of memory" in message and "fewer images" in message
    for internal in ("GiB", "Process", "PYTORCH_CUDA_ALLOC_CONF", "Tried to allocate"):
        assert internal not in message
    # Nothing holds torch's error (and the frames and tensors its traceback keeps alive) while
    # the engine retries a smaller batch.
    assert raised.value.__cause__ is None and raised.value.__context__ is None
    assert any(ALLOCATOR_REPORT in record.getMessage() for record in caplog.records)
