"""Job webhooks against a real local receiver, verified with the independent ``standardwebhooks``
package: signatures, retries with back-off, Retry-After, no retry on client errors, shutdown."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from diffuser_api.config import Settings
from diffuser_api.config.settings import webhook_signing_key
from diffuser_api.service.webhooks import RetryPolicy, WebhookSender
from tests.fakes import FakeRunner, fake_app
from tests.unit.test_api import wait_ready
from tests.unit.test_batches import create_batch, gen_line, jsonl, upload, wait_batch
from tests.unit.test_engine import run_async
from tests.unit.test_jobs import JOBS, submit
from tests.unit.test_jobs import wait_for as wait_for_job

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
JOB = {"id": "imgjob_123", "object": "image.job", "status": "completed"}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    received_at: float


@dataclass
class Receiver:
    """Answers each POST with the next scripted reply (status, headers, delay), then 200."""

    replies: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.deliveries.append(Delivery(dict(self.headers), body, time.monotonic()))
                status, headers, delay_s = receiver.replies.pop(0) if receiver.replies else (200, {}, 0.0)
                time.sleep(delay_s)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return Handler


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/images?token=t0ps3cret"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


def sender(
    url: str, *, max_attempts: int = 5, first_delay_s: float = 0.05, close_grace_s: float = 5.0
) -> WebhookSender:
    """As ``from_settings`` builds it, with test-sized delays."""
    policy = RetryPolicy(max_attempts, first_delay_s=first_delay_s)
    return WebhookSender(url, webhook_signing_key(SECRET), policy, timeout_s=5.0, close_grace_s=close_grace_s)


async def wait_for(condition, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@run_async
async def test_a_message_is_signed_as_standard_webhooks_verifies_it(receiver: Receiver) -> None:
    webhooks = WebhookSender.from_settings(Settings(job_webhook_url=receiver.url, job_webhook_secret=SECRET))
    assert webhooks is not None
    webhooks.send("image.job.completed", JOB)
    await webhooks.close()
    [delivery] = receiver.deliveries
    payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["type"] == "image.job.completed"
    assert payload["data"] == JOB
    assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None
    assert delivery.headers["webhook-id"].startswith("msg_")
    assert delivery.headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(delivery.body, delivery.headers)
    with pytest.raises(WebhookVerificationError):  # the body is what was signed
        Webhook(SECRET).verify(delivery.body.replace(b"completed", b"failed"), delivery.headers)


@run_async
async def test_every_message_has_its_own_id(receiver: Receiver) -> None:
    webhooks = sender(receiver.url)
    for event in ("image.job.completed", "image.job.failed", "image.job.cancelled"):
        webhooks.send(event, JOB)
    await webhooks.close()
    assert len({delivery.headers["webhook-id"] for delivery in receiver.deliveries}) == 3


@run_async
async def test_server_errors_and_429_are_retried_with_growing_delays_and_one_id(receiver: Receiver) -> None:
    receiver.replies = [(503, {}, 0.0), (500, {}, 0.0), (429, {}, 0.0)]
    webhooks = sender(receiver.url, first_delay_s=0.1)
    webhooks.send("image.job.completed", JOB)
    await wait_for(lambda: len(receiver.deliveries) == 4, "four attempts")
    await webhooks.close()
    assert len({delivery.headers["webhook-id"] for delivery in receiver.deliveries}) == 1
    for delivery in receiver.deliveries:  # each attempt signed afresh, each one valid
        assert Webhook(SECRET).verify(delivery.body, delivery.headers)["data"] == JOB
    times = [delivery.received_at for delivery in receiver.deliveries]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # Delay before try k: between half and all of 0.1 s x 2^(k-2).
    for gap, ceiling in zip(gaps, (0.1, 0.2, 0.4), strict=True):
        assert ceiling / 2 <= gap < ceiling + 0.5


@run_async
async def test_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.replies = [(429, {"Retry-After": "1"}, 0.0)]
    webhooks = sender(receiver.url, first_delay_s=0.01)
    webhooks.send("image.job.completed", JOB)
    await wait_for(lambda: len(receiver.deliveries) == 2, "the retry")
    await webhooks.close()
    assert receiver.deliveries[1].received_at - receiver.deliveries[0].received_at >= 1.0


@pytest.mark.parametrize("status", [400, 401, 404, 410, 413, 302])
@run_async
async def test_other_refusals_are_not_retried(receiver: Receiver, status: int, caplog) -> None:
    receiver.replies = [(status, {"Location": "http://elsewhere.invalid/"}, 0.0)]
    webhooks = sender(receiver.url)
    with caplog.at_level(logging.ERROR, logger="diffuser_api.service.webhooks"):
        webhooks.send("image.job.failed", JOB)
        await wait_for(lambda: len(receiver.deliveries) == 1, "the attempt")
        await asyncio.sleep(0.3)  # longer than any retry delay would be
        await webhooks.close()
    assert len(receiver.deliveries) == 1
    assert f"HTTP {status}, not retried" in caplog.text


@run_async
async def test_a_receiver_that_keeps_failing_gets_max_attempts(receiver: Receiver) -> None:
    receiver.replies = [(500, {}, 0.0)] * 10
    webhooks = sender(receiver.url, max_attempts=3, first_delay_s=0.02)
    webhooks.send("image.job.expired", JOB)
    await wait_for(lambda: len(receiver.deliveries) == 3, "three attempts")
    await asyncio.sleep(0.3)
    await webhooks.close()
    assert len(receiver.deliveries) == 3


@run_async
async def test_connection_errors_are_retried_and_logged_without_the_secret_or_the_url_token(caplog) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound then closed: nobody listens there
    url = f"http://127.0.0.1:{port}/hooks?token=t0ps3cret"
    webhooks = sender(url, max_attempts=3, first_delay_s=0.02)
    with caplog.at_level(logging.INFO, logger="diffuser_api.service.webhooks"):
        webhooks.send("image.job.completed", JOB)
        await wait_for(lambda: "given up after 3 attempts" in caplog.text, "the sender to give up")
        await webhooks.close()
    failures = [record for record in caplog.records if "failed: ConnectError" in record.getMessage()]
    assert len(failures) == 3
    assert "imgjob_123" in caplog.text
    for secret_part in (SECRET, SECRET.removeprefix("whsec_"), "t0ps3cret"):
        assert secret_part not in caplog.text


@run_async
async def test_send_returns_at_once_and_never_raises(receiver: Receiver) -> None:
    receiver.replies = [(200, {}, 1.0)]
    webhooks = sender(receiver.url)
    started = time.monotonic()
    webhooks.send("image.job.completed", JOB)
    webhooks.send("image.job.completed", {"id": "imgjob_bad", "created_at": object()})  # not JSON: dropped
    assert time.monotonic() - started < 0.1
    await webhooks.close()
    assert [Webhook(SECRET).verify(d.body, d.headers)["data"]["id"] for d in receiver.deliveries] == ["imgjob_123"]


@run_async
async def test_close_gives_up_on_a_slow_receiver_after_its_grace(receiver: Receiver) -> None:
    receiver.replies = [(200, {}, 3.0)]
    webhooks = sender(receiver.url, close_grace_s=0.2)
    webhooks.send("image.job.completed", JOB)
    await wait_for(lambda: len(receiver.deliveries) == 1, "the attempt to arrive")
    started = time.monotonic()
    await webhooks.close()
    assert time.monotonic() - started < 1.0
    webhooks.send("image.job.completed", JOB)  # after close: dropped, not raised
    await asyncio.sleep(0.1)
    assert len(receiver.deliveries) == 1


def test_no_url_means_no_webhook() -> None:
    assert WebhookSender.from_settings(Settings()) is None


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        ("k" * 44, "whsec_<base64 key>"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "is 5 bytes; it must be 24 to 64"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "is 65 bytes; it must be 24 to 64"),
    ],
)
def test_a_bad_secret_is_refused_without_being_echoed(secret: str, complaint: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(job_webhook_url="https://hooks.example.com/x", job_webhook_secret=secret)
    message = str(refused.value)
    assert "job_webhook_secret" in message and complaint in message
    assert secret.removeprefix("whsec_") not in message


def test_an_unpadded_secret_is_accepted_as_standard_webhooks_libraries_do() -> None:
    settings = Settings(job_webhook_url="https://hooks.example.com/x", job_webhook_secret=SECRET.rstrip("="))
    assert WebhookSender.from_settings(settings) is not None


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"job_webhook_url": "https://hooks.example.com/x"}, "needs DIFFUSER_JOB_WEBHOOK_SECRET"),
        ({"job_webhook_url": "ftp://hooks.example.com/x", "job_webhook_secret": SECRET}, "http:// or https://"),
        ({"job_webhook_url": "hooks.example.com", "job_webhook_secret": SECRET}, "http:// or https://"),
    ],
)
def test_a_webhook_url_must_be_http_and_signed(settings: dict[str, str], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Settings(**settings)


def test_an_async_jobs_final_status_is_posted_signed_with_the_job_object(tmp_path, receiver: Receiver) -> None:
    """The app wires the sender to the jobs: a completed and a cancelled job each reach the
    receiver as ``image.job.<status>`` with the job object, verified by ``standardwebhooks``;
    its images come by url (a body of base64 images could be tens of MB) and the url serves them."""
    app = fake_app(tmp_path, FakeRunner(step_delay_s=0.05), job_poll_s=0.05, max_steps=100,
                   job_webhook_url=receiver.url, job_webhook_secret=SECRET)
    with TestClient(app) as client:
        wait_ready(client)
        done = submit(client, {"prompt": "a red cube", "seed": 1})
        assert wait_for_job(client, done["id"])["status"] == "completed"
        long = submit(client, {"prompt": "a long one", "num_inference_steps": 80})
        assert client.post(f"{JOBS}/{long['id']}/cancel").status_code == 200
        wait_for_job(client, long["id"], ("cancelled",))
        deadline = time.monotonic() + 30  # a delivery retries with back-off on a busy machine
        while len(receiver.deliveries) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        verifier = Webhook(SECRET)
        messages = {}
        for delivery in receiver.deliveries:
            message = verifier.verify(delivery.body, delivery.headers)
            messages[message["data"]["id"]] = message
        assert messages[done["id"]]["type"] == "image.job.completed"
        image = messages[done["id"]]["data"]["result"]["data"][0]
        assert "b64_json" not in image and image["url"].startswith("http://")
        served = client.get(urlsplit(image["url"]).path)
        assert served.status_code == 200 and served.content.startswith(b"\x89PNG")
    assert messages[long["id"]]["type"] == "image.job.cancelled"
    assert messages[long["id"]]["data"]["status"] == "cancelled"


def test_a_batch_is_announced_once_by_its_final_status_not_once_per_line(tmp_path, receiver: Receiver) -> None:
    app = fake_app(tmp_path, FakeRunner(), job_poll_s=0.05, job_webhook_url=receiver.url, job_webhook_secret=SECRET)
    with TestClient(app) as client:
        wait_ready(client)
        file = upload(client, jsonl([gen_line(index) for index in range(3)]))
        batch = create_batch(client, file["id"])
        assert wait_batch(client, batch["id"])["status"] == "completed"
        deadline = time.monotonic() + 10
        while not receiver.deliveries and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # any per-line message would have come by now
    messages = [Webhook(SECRET).verify(delivery.body, delivery.headers) for delivery in receiver.deliveries]
    assert [message["type"] for message in messages] == ["batch.completed"]
    assert messages[0]["data"]["id"] == batch["id"]
    assert messages[0]["data"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}


@pytest.mark.parametrize("lines", [6, 20])  # all in one pipeline call; over several
def test_a_batch_completes_when_its_last_line_ends_not_at_the_next_poll(tmp_path, receiver: Receiver, lines: int):
    """Only the last of a batch's lines running here asks whether the batch is done; with a
    webhook awaited as each line is announced, lines that end together must still not all
    count each other as running (then nobody would ask, and the batch would wait for the poll)."""
    from tests.unit.test_batches import create_batch, gen_line, jsonl, upload, wait_batch

    app = fake_app(tmp_path, FakeRunner(), job_poll_s=30, job_webhook_url=receiver.url, job_webhook_secret=SECRET)
    with TestClient(app) as client:
        wait_ready(client)
        batch = create_batch(client, upload(client, jsonl([gen_line(index) for index in range(lines)]))["id"])
        started = time.monotonic()
        done = wait_batch(client, batch["id"], timeout_s=25)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == lines
        assert time.monotonic() - started < 10, "the batch waited for the dispatcher's poll"
