"""The soak's request mix: what each of its clients sends, and how every answer is labelled.

Every kind a user can send goes through the real transports (JSON, multipart, SSE, WebSocket),
including clients that leave mid-stream and a catalogue of bad inputs. Each kind names the
answers it expects, so the report can point at anything else. Loopback only; every loop is
bounded by a deadline and a request count.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from tests.fakes import png_bytes
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, WebSocketException

from bench.load import GENERATIONS, payload

EDITS = "/v1/images/edits"
SOCKET = "/v1/images/ws"
ENVELOPE_KEYS = ("message", "type", "param", "code", "request_id")
QUEUE_FULL = "rate_limit_exceeded"
THINK_S = 0.2  # a client pauses up to this long between requests, so 64 of them are not a busy loop
MOST_RETRY_WAIT_S = 1.0  # a client honours Retry-After up to this long, then sends again


@dataclass(frozen=True)
class Answer:
    """What a client saw: ``label`` is the status ("429"), or what a stream or socket ended with."""

    label: str
    status: int | None = None
    retry_after: str | None = None
    error: dict[str, Any] | None = None

    @property
    def envelope_complete(self) -> bool:
        """OpenAI's error object with every field, and the request id filled in."""
        return self.error is not None and all(key in self.error for key in ENVELOPE_KEYS) and bool(
            self.error["request_id"]) and bool(self.error["message"])


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    answer: Answer
    seconds: float

    @property
    def expected(self) -> bool:
        return self.answer.label in self.kind.expected


@dataclass
class Client:
    """One simulated user: a shared connection pool, its own random choices."""

    http: httpx.AsyncClient
    socket_url: str
    rng: random.Random
    side: int
    steps: tuple[int, int]
    png: bytes

    def generation(self, **extra: Any) -> dict[str, Any]:
        return payload(self.side, self.rng.randint(*self.steps)) | {"response_format": "b64_json"} | extra

    def edit_form(self) -> dict[str, str]:
        body = self.generation(prompt="the fox in winter")
        return {key: str(value) for key, value in body.items()}


def http_answer(response: httpx.Response) -> Answer:
    error = _error_object(response.content) if response.status_code >= 400 else None
    return Answer(str(response.status_code), response.status_code, response.headers.get("retry-after"), error)


def _error_object(raw: bytes | str) -> dict[str, Any] | None:
    try:
        error = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) else None


# Normal traffic --------------------------------------------------------------------------------

async def generation(client: Client) -> Answer:
    return http_answer(await client.http.post(GENERATIONS, json=client.generation()))


async def edit(client: Client) -> Answer:
    files = {"image": ("fox.png", client.png, "image/png")}
    if client.rng.random() < 0.5:  # half inpaint: a transparent mask marks the area to change
        files["mask"] = ("mask.png", png_bytes((client.side, client.side), (0, 0, 0, 0), "RGBA"), "image/png")
    return http_answer(await client.http.post(EDITS, data=client.edit_form(), files=files))


async def stream(client: Client, *, leave_early: bool = False) -> Answer:
    body = client.generation(stream=True, partial_images=1)
    async with client.http.stream("POST", GENERATIONS, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return http_answer(response)
        event, completed = "", False
        async for line in response.aiter_lines():
            if leave_early and line.startswith(("event:", ":")):
                return Answer("200, left early", 200)
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
                completed = completed or event.endswith(".completed")
            elif line.startswith("data:") and event == "error":
                error = _error_object(line.removeprefix("data:"))
                return Answer(f"200, error event {error and error.get('code')}", 200, error=error)
    return Answer("200" if completed else "200, no completed event", 200)


async def stream_left_early(client: Client) -> Answer:
    return await stream(client, leave_early=True)


async def socket_session(client: Client, first: Any = None, *, leave_early: bool = False) -> Answer:
    """One WebSocket session; the server closes it after ``done`` or an error message."""
    message = client.generation(partial_images=1) if first is None else first
    async with connect(client.socket_url, open_timeout=30, close_timeout=5) as socket:
        await socket.send(json.dumps(message))
        answer = Answer("ws closed before done")
        try:
            async for raw in socket:
                if leave_early:
                    return Answer("ws left early")
                received = json.loads(raw)
                if received.get("type") == "error":
                    error = received.get("error")
                    answer = Answer(f"ws error {error and error.get('code')}", error=error)
                elif received.get("type") == "done":
                    answer = Answer("ws done")
        except ConnectionClosedError:
            if answer.error is None:  # an error message is followed by close code 1008, as documented
                raise
    return answer


async def socket_left_early(client: Client) -> Answer:
    return await socket_session(client, leave_early=True)


# Bad inputs ------------------------------------------------------------------------------------

async def malformed_json(client: Client) -> Answer:
    body = b'{"prompt": "a fox", "size": '
    return http_answer(await client.http.post(GENERATIONS, content=body, headers={"content-type": "application/json"}))


async def unknown_field(client: Client) -> Answer:
    return http_answer(await client.http.post(GENERATIONS, json=client.generation(colour="red")))


async def huge_size(client: Client) -> Answer:
    return http_answer(await client.http.post(GENERATIONS, json=client.generation(size="100000x100000")))


async def too_many_steps(client: Client) -> Answer:
    return http_answer(await client.http.post(GENERATIONS, json=client.generation(num_inference_steps=1_000_000)))


async def unknown_model(client: Client) -> Answer:
    return http_answer(await client.http.post(GENERATIONS, json=client.generation(model="no-such-model")))


async def wrong_content_type(client: Client) -> Answer:
    body = b"prompt=a+fox&size=64x64"
    return http_answer(await client.http.post(GENERATIONS, content=body, headers={"content-type": "text/plain"}))


async def wrong_method(client: Client) -> Answer:
    return http_answer(await client.http.get(GENERATIONS))


async def non_image_upload(client: Client) -> Answer:
    files = {"image": ("fox.png", b"these are notes, not a picture", "image/png")}
    return http_answer(await client.http.post(EDITS, data=client.edit_form(), files=files))


async def truncated_png(client: Client) -> Answer:
    files = {"image": ("fox.png", client.png[: len(client.png) // 2], "image/png")}
    return http_answer(await client.http.post(EDITS, data=client.edit_form(), files=files))


async def mask_size_mismatch(client: Client) -> Answer:
    mask = png_bytes((client.side // 2, client.side // 2), (0, 0, 0, 0), "RGBA")
    files = {"image": ("fox.png", client.png, "image/png"), "mask": ("mask.png", mask, "image/png")}
    return http_answer(await client.http.post(EDITS, data=client.edit_form(), files=files))


async def edit_without_image(client: Client) -> Answer:
    # With no file httpx sends the fields url-encoded, which the edit route reads as a form too.
    return http_answer(await client.http.post(EDITS, data=client.edit_form()))


async def several_images(client: Client) -> Answer:
    files = [("image[]", ("a.png", client.png, "image/png")), ("image[]", ("b.png", client.png, "image/png"))]
    return http_answer(await client.http.post(EDITS, data=client.edit_form(), files=files))


async def socket_not_an_object(client: Client) -> Answer:
    return await socket_session(client, first=["a fox"])


@dataclass(frozen=True)
class Kind:
    name: str
    weight: float
    send: Callable[[Client], Awaitable[Answer]]
    expected: tuple[str, ...]
    bad: bool = False


SERVED = ("200", "429")
KINDS: tuple[Kind, ...] = (
    Kind("generation", 30, generation, SERVED),
    Kind("edit (multipart)", 12, edit, SERVED),
    Kind("stream (SSE)", 10, stream, SERVED),
    Kind("stream, client leaves", 4, stream_left_early, ("200, left early", "429")),
    Kind("WebSocket session", 10, socket_session, ("ws done", f"ws error {QUEUE_FULL}")),
    Kind("WebSocket, client leaves", 4, socket_left_early, ("ws left early",)),
    Kind("bad: malformed JSON", 2, malformed_json, ("400",), bad=True),
    Kind("bad: unknown field", 2, unknown_field, ("400",), bad=True),
    Kind("bad: size 100000x100000", 2, huge_size, ("400",), bad=True),
    Kind("bad: 1,000,000 steps", 2, too_many_steps, ("400",), bad=True),
    Kind("bad: unknown model", 2, unknown_model, ("404",), bad=True),
    Kind("bad: text/plain body", 2, wrong_content_type, ("400", "415"), bad=True),
    Kind("bad: GET on generations", 2, wrong_method, ("405",), bad=True),
    Kind("bad: non-image upload", 2, non_image_upload, ("400",), bad=True),
    Kind("bad: truncated PNG", 2, truncated_png, ("400",), bad=True),
    Kind("bad: mask of another size", 2, mask_size_mismatch, ("400",), bad=True),
    Kind("bad: edit without image", 2, edit_without_image, ("400",), bad=True),
    Kind("bad: two images on SD (501)", 2, several_images, ("501",), bad=True),
    Kind("bad: WebSocket message not an object", 2, socket_not_an_object, ("ws error invalid_json",), bad=True),
)
CLIENT_FAILURES = (httpx.HTTPError, WebSocketException, OSError, TimeoutError)


def _pause_s(answer: Answer, rng: random.Random) -> float:
    if answer.status == 429 and answer.retry_after is not None:
        try:
            return min(float(answer.retry_after), MOST_RETRY_WAIT_S)
        except ValueError:
            pass
    return rng.uniform(0, THINK_S)


async def run_mix(
    base_url: str,
    *,
    clients: int,
    seconds: float,
    side: int,
    steps: tuple[int, int],
    seed: int,
    max_requests_per_client: int,
    timeout_s: float,
) -> list[Outcome]:
    """``clients`` users send random kinds until ``seconds`` have passed; started requests finish
    (each within ``timeout_s``), so the whole run ends within ``seconds + timeout_s + THINK_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    socket_url = base_url.replace("http://", "ws://", 1) + SOCKET
    png = png_bytes((side, side))
    weights = [kind.weight for kind in KINDS]
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:

        async def one_client(index: int) -> None:
            client = Client(http, socket_url, random.Random(seed * 100_003 + index), side, steps, png)
            for _ in range(max_requests_per_client):
                if loop.time() >= deadline:
                    return
                kind = client.rng.choices(KINDS, weights)[0]
                started = time.perf_counter()
                try:
                    answer = await asyncio.wait_for(kind.send(client), timeout_s)
                except CLIENT_FAILURES as failure:
                    answer = Answer(type(failure).__name__)
                outcomes.append(Outcome(kind, answer, time.perf_counter() - started))
                await asyncio.sleep(_pause_s(answer, client.rng))

        await asyncio.gather(*(one_client(index) for index in range(clients)))
    return outcomes
