"""A request larger than one batch runs as several: its seeds in chunks that each fit.

One call over the batch budget could hold the only worker for as long as the client likes and
run the device out of memory; chunks keep every pipeline call within ``max_batch_size`` images
and ``max_batch_pixels`` pixels, and let other requests' batches run between them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

from diffuser_api.domain import ImageJob, StepProgress
from diffuser_api.engine.job import ProgressSink


def split_work(work: ImageJob, max_images: int, max_pixels: int) -> list[ImageJob]:
    """``work`` itself when it fits one batch, else chunks of its seeds in order.

    A single image larger than ``max_pixels`` cannot be split: it runs as a chunk of one.
    """
    per_chunk = max(1, min(max_images, max_pixels // (work.width * work.height)))
    if work.n <= per_chunk:
        return [work]
    return [
        dataclasses.replace(work, seeds=work.seeds[start : start + per_chunk])
        for start in range(0, work.n, per_chunk)
    ]


class SplitProgress:
    """Reports a split request's chunks as one request's progress.

    Steps add up over the chunks (``total`` is steps per chunk times chunks), so a client sees
    one count that only goes up, whichever chunk moved; previews keep their image's index in
    the request. Runs on the event loop (jobs post their progress there).
    """

    def __init__(self, sink: ProgressSink, chunks: Sequence[ImageJob]) -> None:
        self._sink = sink
        self._first_images = [sum(chunk.n for chunk in chunks[:index]) for index in range(len(chunks))]
        self._steps = [0] * len(chunks)

    def of_chunk(self, index: int) -> ProgressSink:
        return partial(self._report, index)

    def _report(self, index: int, progress: StepProgress) -> None:
        self._steps[index] = progress.step
        self._sink(
            StepProgress(
                step=sum(self._steps),
                total=progress.total * len(self._steps),
                previews=progress.previews,
                first_image=self._first_images[index] + progress.first_image,
            )
        )
