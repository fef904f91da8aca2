"""One replica of a model's deployment: our registry and engine serving that one model.

The replica loads its model when Ray starts it (the model is pinned here: Ray's replicas and
autoscaling, not our LRU, decide what is in memory), then runs each request the ingress sends
as a stream of wire messages (``wire.py``). Batching, priority and cancellation are the
engine's, as in one process: a request the ingress cancels is cancelled here, and its batch
stops at the next step once no request is left in it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from diffuser_api.config import Settings
from diffuser_api.config.models_file import serving_plan
from diffuser_api.domain import StepProgress
from diffuser_api.engine.job import JobTiming
from diffuser_api.engine.priority import Priority
from diffuser_api.engine.updates import QueuePosition, job_updates
from diffuser_api.engine.worker import BatchReport
from diffuser_api.errors import DiffuserError
from diffuser_api.log_format import configure_logging
from diffuser_api.models.spec import ServingPlan
from diffuser_api.ray_serve import wire

logger = logging.getLogger(__name__)


class ModelReplica:
    """The deployment class; ``application.py`` wraps it with ``serve.deployment``."""

    def __init__(self, model_id: str) -> None:
        """Serves the models-file entry ``model_id``; settings come from the environment (the
        application's ``runtime_env``), as in one process."""
        from diffuser_api.main import build_registry  # torch and diffusers: only in replicas

        resolved = Settings()
        configure_logging(resolved.log_level, resolved.log_format)
        spec = next(spec for spec in serving_plan(resolved).models if spec.id == model_id)
        self._registry = build_registry(resolved, ServingPlan((dataclasses.replace(spec, pinned=True),), spec.id))
        self._model = self._registry.default
        self._grace_s = resolved.shutdown_grace_s
        # Batches finished since the last reply: each goes back to the ingress's /metrics once,
        # with whichever reply leaves next.
        self._unsent_reports: list[BatchReport] = []
        self._registry.observe_batches(lambda _: self._heard)
        self._steps_done = 0
        self._outcomes: dict[str, int] = {}
        self._started = False

    def _heard(self, report: BatchReport) -> None:
        self._unsent_reports.append(report)
        self._steps_done += report.steps
        self._outcomes[report.outcome] = self._outcomes.get(report.outcome, 0) + 1

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._registry.start()

    async def check_health(self) -> None:
        """Ray's health check: a replica whose model failed or whose workers keep dying is
        replaced by Ray."""
        await self._start()
        if (problem := self._registry.health_problem()) is not None:
            raise RuntimeError(problem.message)

    async def ready(self) -> str:
        """Answers once the model is loaded: the ingress's way to wait for a replica."""
        await self._start()
        return self._model.status.value

    async def figures(self) -> dict[str, Any]:
        """This replica's own figures, for an operator (or a test) calling the deployment:
        which replica answered, its requests in flight, the steps it ran, its batches' outcomes."""
        from ray import serve

        context = serve.get_replica_context()
        return {
            "actor_name": context.replica_id.to_full_id_str(),
            "in_flight": self._model.leases,
            "steps_done": self._steps_done,
            "batches": dict(self._outcomes),
        }

    async def run(self, message: wire.Message) -> AsyncIterator[wire.Message]:
        """One request's updates as wire messages; its error, if any, is the last message."""
        await self._start()
        job = wire.job_from_wire(message)
        deadline = time.monotonic() + message["remaining_s"]
        timing = JobTiming()
        try:
            async with self._registry.lease(self._model, deadline=deadline) as engine:
                async for update in job_updates(engine, job, timing, deadline, Priority(message["priority"])):
                    if isinstance(update, QueuePosition):
                        yield {"queued": update.position}
                    elif isinstance(update, StepProgress):
                        yield {"progress": wire.progress_to_wire(update)}
                    else:
                        yield {"images": wire.images_to_wire(update.images), **self._figures(timing)}
        except DiffuserError as error:
            yield {"error": wire.error_to_wire(error), **self._figures(timing)}

    def _figures(self, timing: JobTiming) -> wire.Message:
        reports, self._unsent_reports = self._unsent_reports, []
        return {"timing": wire.timing_to_wire(timing), "batches": [wire.report_to_wire(report) for report in reports]}

    async def __del__(self) -> None:
        """Ray calls this when it stops the replica: running requests get the grace."""
        await self._registry.stop(self._grace_s)
