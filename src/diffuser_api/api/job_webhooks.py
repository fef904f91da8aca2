"""The job webhook: every final status of an async job or a batch is POSTed, signed, to the
configured URL."""

from __future__ import annotations

from diffuser_api.api.batches import batch_object
from diffuser_api.api.jobs import job_object
from diffuser_api.config import Settings
from diffuser_api.jobs.batch_records import BatchRecord
from diffuser_api.jobs.batch_service import BatchObserver, BatchService
from diffuser_api.jobs.dispatcher import FinalHook
from diffuser_api.jobs.records import JobRecord
from diffuser_api.jobs.service import JobState
from diffuser_api.service.storage import ImageStorage
from diffuser_api.service.webhooks import WebhookSender


def webhook_job_files_base(settings: Settings) -> str:
    """Where a job's images are served (``GET /v1/images/files/jobs/{name}``). A webhook has no
    request to take a host from: the public base URL when one is set, else the address the
    server listens on."""
    base = (settings.public_base_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    return f"{base}{settings.api_prefix}/images/files/jobs"


def job_webhook(sender: WebhookSender, storage: ImageStorage, settings: Settings) -> FinalHook:
    """``image.job.<status>`` with the job object, its images by ``url`` as a list gives them: a
    job of ten 1024x1024 images in base64 is a body of tens of MB, which receivers' body limits
    refuse, and each message is held in memory through its retries while a receiver is down."""
    url_base = webhook_job_files_base(settings)

    async def send_final(record: JobRecord) -> None:
        if record.batch_id is not None:  # a batch's lines: the batch itself is announced once
            return
        job = await job_object(JobState(record, None), storage, url_base, images_as_urls=True)
        sender.send(f"image.job.{record.status.value}", job)

    return send_final


def batch_webhook(sender: WebhookSender, batches: BatchService) -> BatchObserver:
    """``batch.<status>`` (completed, failed, cancelled, expired) with the batch object."""

    async def send_final(record: BatchRecord) -> None:
        sender.send(f"batch.{record.status.value}", batch_object(await batches.state(record)))

    return send_final
