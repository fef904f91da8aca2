"""The model-backend interface: what the service needs from a model that can run its work.

The in-process ``Engine`` is one implementation; a Ray Serve deployment handle
(``diffuser_api.ray_serve.remote``) is another. The service leases a backend from the registry
and never learns which one it got.
"""

from __future__ import annotations

from typing import Protocol

from diffuser_api.domain import GeneratedImage, ImageJob
from diffuser_api.engine.job import JobTiming, ProgressSink, WorkerEncoders
from diffuser_api.engine.priority import Priority


class ModelBackend(Protocol):
    async def submit(
        self,
        work: ImageJob,
        progress: ProgressSink | None = None,
        timing: JobTiming | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        encoders: WorkerEncoders | None = None,
    ) -> list[GeneratedImage]:
        """Run the work and return its images in seed order, reporting steps and previews to
        ``progress``; cancelling the awaiting task stops the work at its next step. ``priority``
        is the work's scheduling class (interactive, async job, batch line). A backend may
        encode previews and images with ``encoders`` where it makes them, or return them as
        images for the caller to encode."""
        ...

    def queue_position(self, work: ImageJob) -> int | None:
        """Requests ahead of ``work`` while it waits; None once it runs (or when unknown)."""
        ...

    def check_room(self) -> None:
        """Raise now the 429/503 that ``submit`` would for a full queue, where that is known."""
        ...
