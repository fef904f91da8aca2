"""``GET /metrics`` in Prometheus format: what the HTTP side, the engine and the devices do.

Each app has its own ``CollectorRegistry``, never prometheus-client's global one, so two apps in
one process (tests, Ray Serve replicas) count separately. Figures that exist anyway (queue
depth, load time, device memory) are read at scrape time rather than copied on every change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuser_api.api.request_record import record_of
from diffuser_api.api.responses import METRICS_ANSWER, error_responses
from diffuser_api.domain.devices import DeviceMemoryProbe
from diffuser_api.engine.worker import BatchObserver, BatchReport
from diffuser_api.jobs.records import JobRecord, JobStatus
from diffuser_api.models.registry import ModelRegistry, ModelStatus

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Async jobs may wait in their queue for hours.
JOB_SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
ATTEMPTS = (1, 2, 3, 5, 10)
# Where an evicted model's weights went: host memory (the warm tier), or nowhere.
EVICTION_KINDS = ("host", "released")

router = APIRouter(tags=["service"])


class ServiceMetrics:
    def __init__(
        self,
        models: ModelRegistry,
        device_memory: DeviceMemoryProbe | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffuser_requests", "HTTP requests answered", ["endpoint", "model", "status"],
                                registry=r)
        self.request_seconds = Histogram("diffuser_request_duration_seconds", "Time from request to response",
                                          ["endpoint"], buckets=SECONDS, registry=r)
        self.in_flight = Gauge("diffuser_requests_in_flight", "HTTP requests being answered now", registry=r)
        self.queue_wait = Histogram("diffuser_queue_wait_seconds", "Time a job waited before its batch ran",
                                    ["model"], buckets=SECONDS, registry=r)
        self.compute = Histogram("diffuser_compute_seconds", "Time of one pipeline call (one batch)",
                                 ["model"], buckets=SECONDS, registry=r)
        self.batch_size = Histogram("diffuser_batch_size_images", "Images made by one pipeline call", ["model"],
                                    buckets=BATCH_SIZES, registry=r)
        self.batches = Counter("diffuser_batches", "Pipeline calls by outcome", ["model", "outcome"], registry=r)
        self.images = Counter("diffuser_images_generated", "Images made by successful pipeline calls", ["model"],
                              registry=r)
        self.steps = Counter("diffuser_denoising_steps", "Denoising steps run (one step serves a whole batch)",
                             ["model"], registry=r)
        self.steps_per_second = Gauge("diffuser_steps_per_second", "Denoising steps per second of the last batch",
                                      ["model"], registry=r)
        self.rate_limit_store_errors = Counter(
            "diffuser_rate_limit_store_errors", "Calls to the rate-limit store that failed or timed out", registry=r
        )
        self.job_seconds = Histogram("diffuser_job_duration_seconds", "Async jobs, from queued to finished",
                                     ["model", "status"], buckets=JOB_SECONDS, registry=r)
        self.job_attempts = Histogram("diffuser_job_attempts", "Runs an async job started before it finished",
                                      ["model", "status"], buckets=ATTEMPTS, registry=r)
        r.register(LiveFigures(models, device_memory))
        models.observe_batches(self.batch_observer)

    def count_jobs(self, job_counts: Callable[[], dict[str, int]]) -> None:
        """Report the jobs by status that ``job_counts`` gives at scrape time."""
        self.registry.register(JobsByStatus(job_counts))

    def batch_observer(self, model_id: str) -> BatchObserver:
        """Runs on the worker thread after each pipeline call; prometheus-client is thread-safe."""

        def observe(report: BatchReport) -> None:
            self.batches.labels(model_id, report.outcome).inc()
            self.compute.labels(model_id).observe(report.compute_s)
            self.batch_size.labels(model_id).observe(report.size)
            self.steps.labels(model_id).inc(report.steps)
            for wait in report.queue_wait_s:
                self.queue_wait.labels(model_id).observe(wait)
            if report.outcome == "ok":
                self.images.labels(model_id).inc(report.size)
            if report.steps and report.compute_s > 0:
                self.steps_per_second.labels(model_id).set(report.steps / report.compute_s)

        return observe

    def observe_job(self, job: JobRecord) -> None:
        """Called once per job as it reaches a final status."""
        if job.status is JobStatus.EXPIRED or job.completed_at is None:
            return
        self.job_seconds.labels(job.model, job.status.value).observe(max(0.0, job.completed_at - job.created_at))
        self.job_attempts.labels(job.model, job.status.value).observe(job.attempts)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LiveFigures(Collector):
    """Per model: status, queue depth, loads, evictions and resident memory, read when scraped
    from the registry, which keeps them anyway; and device memory."""

    def __init__(self, models: ModelRegistry, device_memory: DeviceMemoryProbe | None) -> None:
        self._models = models
        self._device_memory = device_memory

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("diffuser_model_ready", "1 when the model serves, 0 otherwise", labels=["model"])
        status = GaugeMetricFamily("diffuser_model_status", "1 for the model's current status, 0 for the others",
                                   labels=["model", "status"])
        depth = GaugeMetricFamily("diffuser_queue_depth", "Requests waiting in the model's queue", labels=["model"])
        busy = GaugeMetricFamily("diffuser_busy_workers", "Workers running a batch now", labels=["model"])
        load = GaugeMetricFamily("diffuser_model_load_seconds", "Time of the model's last load (and warm-up)",
                                 labels=["model"])
        loads = CounterMetricFamily("diffuser_model_loads", "Loads of the model, from disk or from host memory",
                                    labels=["model"])
        evictions = CounterMetricFamily("diffuser_model_evictions", "Evictions to make room, by where the weights went",
                                        labels=["model", "kind"])
        resident = GaugeMetricFamily("diffuser_model_resident_bytes", "Bytes of the model's weights on the device",
                                     labels=["model", "device"])
        for model in self._models:
            ready.add_metric([model.id], float(model.status is ModelStatus.READY))
            for value in ModelStatus:
                status.add_metric([model.id, value.value], float(model.status is value))
            depth.add_metric([model.id], model.queue_depth())
            engine = model.engine_now
            busy.add_metric([model.id], sum(worker.busy for worker in engine.workers) if engine else 0)
            if model.load_seconds is not None:
                load.add_metric([model.id], model.load_seconds)
            loads.add_metric([model.id], model.loads)
            for kind in EVICTION_KINDS:
                evictions.add_metric([model.id, kind], model.evictions.get(kind, 0))
            for device, size in model.resident_bytes().items():
                resident.add_metric([model.id, device], size)
        yield from (ready, status, depth, busy, load, loads, evictions, resident)
        if self._device_memory is not None:
            yield from self._memory()

    def _memory(self) -> Iterator[Metric]:
        assert self._device_memory is not None
        families = {
            field: GaugeMetricFamily(f"diffuser_gpu_memory_{field}", f"Device memory, {text}", labels=["device"])
            for field, text in (
                ("allocated_bytes", "allocated by tensors"),
                ("reserved_bytes", "held by the caching allocator"),
                ("total_bytes", "total"),
            )
        }
        for memory in self._device_memory():
            for field, family in families.items():
                family.add_metric([memory.device], getattr(memory, field))
        yield from families.values()


class JobsByStatus(Collector):
    """Async jobs by status, counted in the jobs database (so across replicas) at the jobs
    dispatcher's last poll: a scrape reads the figures it keeps and never queries the database
    on the event loop."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("diffuser_jobs", "Async jobs in the database by status", labels=["status"])
        counts = self._counts()
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs


class HttpMetricsMiddleware:
    """Counts answered requests by route template (not raw path, which would let clients
    create a series per random file name), model and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        started = time.monotonic()

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self._metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_counted)
        finally:
            self._metrics.in_flight.dec()
            endpoint = route_template(scope)
            model = record_of(HTTPConnection(scope)).model or ""
            self._metrics.requests.labels(endpoint, model, str(status or 500)).inc()
            self._metrics.request_seconds.labels(endpoint).observe(time.monotonic() - started)


def route_template(scope: Scope) -> str:
    """The matched route as a template (``/v1/images/files/{name}``), rebuilt from the path and
    its parameters: the route object knows only its path inside the router that holds it."""
    if "route" not in scope:
        return "unmatched"
    path = scope["path"]
    for name, value in scope.get("path_params", {}).items():
        head, found, tail = path.rpartition(str(value)) if str(value) else ("", "", "")
        if found:
            path = f"{head}{{{name}}}{tail}"
    return path


@router.get(
    "/metrics", summary="Prometheus metrics", response_class=Response,
    responses=METRICS_ANSWER | error_responses(),
)
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
