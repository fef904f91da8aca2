"""The ingress's side of a model deployment: a ``ModelBackend`` over its ``DeploymentHandle``.

Each request is one streaming call (``handle.options(stream=True)``) to a replica's ``run``:
queue positions and step reports (with previews) flow back while it runs, then its images.
A client that leaves cancels the call (``response.cancel()``), which cancels the job in the
replica's engine. Ray's own exceptions are turned into ours here and go no further.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException, RequestCancelledError

from diffuser_api.domain import GeneratedImage, ImageJob
from diffuser_api.engine.job import JobTiming, ProgressSink, WorkerEncoders
from diffuser_api.engine.priority import Priority
from diffuser_api.engine.worker import BatchObserver
from diffuser_api.errors import Cancelled, DiffuserError, ModelFailure, Overloaded, Unavailable
from diffuser_api.ray_serve import wire

logger = logging.getLogger(__name__)

# A replica that died (or a deployment with no replica left) is replaced by Ray within seconds:
# the client retries, and another replica serves it.
REPLICA_LOST_RETRY_AFTER_S = 1.0
# Every replica's queue is full (``max_queued_requests``): a batch's time is a fair wait.
REPLICAS_FULL_RETRY_AFTER_S = 2.0
# The replica enforces the request's deadline; the ingress waits this much longer before it
# gives up on a replica that stopped answering.
DEADLINE_MARGIN_S = 5.0


class RemoteEngine:
    """One model's deployment, seen from the ingress; see the module docstring."""

    def __init__(
        self, handle: Any, model_id: str, request_timeout_s: float, observers: Sequence[BatchObserver]
    ) -> None:
        """``observers`` (the ingress's metrics) hear of the replicas' batches as the replies
        bring them back."""
        self._calls = handle.options(stream=True, method_name="run")
        self._model_id = model_id
        self._request_timeout_s = request_timeout_s
        self._observers = observers
        self._positions: dict[int, int | None] = {}  # id(work) -> its last queue position

    async def submit(
        self,
        work: ImageJob,
        progress: ProgressSink | None = None,
        timing: JobTiming | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.INTERACTIVE,
        encoders: WorkerEncoders | None = None,
    ) -> list[GeneratedImage]:
        # ``encoders`` are not used: images are made in a replica, on its own machine, and come
        # back as arrays; the ingress encodes them on its own (free) cores.
        deadline = deadline or time.monotonic() + self._request_timeout_s
        replies = self._calls.remote(wire.job_to_wire(work, max(0.0, deadline - time.monotonic()), priority))
        self._positions[id(work)] = None
        answered = False
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + DEADLINE_MARGIN_S):
                async for reply in replies:
                    if "queued" in reply:
                        self._positions[id(work)] = reply["queued"]
                        continue
                    if "progress" in reply:
                        self._positions[id(work)] = None
                        if progress is not None:
                            progress(wire.progress_from_wire(reply["progress"]))
                        continue
                    answered = True
                    self._take_figures(reply, timing)
                    if "error" in reply:
                        raise wire.error_from_wire(reply["error"])
                    return wire.images_from_wire(reply["images"])
        except TimeoutError:
            raise Unavailable(f"model '{self._model_id}' did not answer in time; retry later",
                              retry_after=REPLICA_LOST_RETRY_AFTER_S) from None
        except (RayError, RayServeException) as error:
            raise self._ours(error) from None
        finally:
            del self._positions[id(work)]
            if not answered:
                replies.cancel()  # the client left (or the call failed): the replica stops the job
        raise Unavailable(f"a replica of model '{self._model_id}' ended the request without an answer; retry",
                          retry_after=REPLICA_LOST_RETRY_AFTER_S)

    def queue_position(self, work: ImageJob) -> int | None:
        return self._positions.get(id(work))

    def check_room(self) -> None:
        """Replicas' queues are not known here without a call: ``submit`` says 429 when full."""

    def _take_figures(self, reply: wire.Message, timing: JobTiming | None) -> None:
        if timing is not None:
            wire.timing_from_wire(reply["timing"], timing)
        for figures in reply["batches"]:
            report = wire.report_from_wire(figures)
            for observe in self._observers:
                observe(report)

    def _ours(self, error: Exception) -> DiffuserError:
        """Ray's exception in our words; the log keeps Ray's."""
        if isinstance(error, BackPressureError):
            return Overloaded(f"every replica of model '{self._model_id}' has a full queue; retry later",
                              retry_after=getattr(error, "retry_after_s", None) or REPLICAS_FULL_RETRY_AFTER_S)
        if isinstance(error, RequestCancelledError):
            return Cancelled(f"the request to model '{self._model_id}' was cancelled")
        if isinstance(error, RayTaskError):
            logger.error("a replica of %s failed: %s", self._model_id, error)
            return ModelFailure(f"model '{self._model_id}' failed; the server's log says why")
        logger.warning("a replica of %s was lost: %s", self._model_id, error)
        return Unavailable(f"the replica of model '{self._model_id}' serving this request stopped; retry",
                           retry_after=REPLICA_LOST_RETRY_AFTER_S)
