"""Four clients each stream a huge body at the server while its RSS is sampled.

A server that buffers bodies before checking their size holds every byte a client sends; one
that enforces its limits while reading holds a chunk or two. The bodies are generated on the
fly (one reused chunk), so the sender itself stays small. Both framings are sent, because a
limit that trusts Content-Length alone misses chunked bodies.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from bench.load import GENERATIONS
from bench.rss import MB, RssSamples, rss_bytes, sampled
from bench.soak_mix import CLIENT_FAILURES, EDITS, http_answer

CHUNK = b"a" * MB
BOUNDARY = "soak-huge-body-boundary"


@dataclass(frozen=True)
class HugeBody:
    """One body: ``prefix``, filler up to the full size, ``suffix``; chunked unless ``declared``."""

    label: str
    path: str
    content_type: str
    prefix: bytes
    suffix: bytes
    declared: bool

    async def chunks(self, size: int, progress: HugeResult) -> AsyncIterator[bytes]:
        filler = size - len(self.prefix) - len(self.suffix)
        whole, rest = divmod(filler, len(CHUNK))
        for piece in itertools.chain((self.prefix,), itertools.repeat(CHUNK, whole), (CHUNK[:rest], self.suffix)):
            progress.sent_bytes += len(piece)
            yield piece


def huge_bodies() -> tuple[HugeBody, ...]:
    """A generation whose prompt is the whole body, and an edit whose image part is."""
    prompt = (b'{"prompt": "', b'", "size": "64x64"}')
    image = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na fox\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="huge.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode(),
        f"\r\n--{BOUNDARY}--\r\n".encode(),
    )
    multipart = f"multipart/form-data; boundary={BOUNDARY}"
    return (
        HugeBody("generations, JSON, chunked", GENERATIONS, "application/json", *prompt, declared=False),
        HugeBody("generations, JSON, Content-Length", GENERATIONS, "application/json", *prompt, declared=True),
        HugeBody("edits, multipart, chunked", EDITS, multipart, *image, declared=False),
        HugeBody("edits, multipart, Content-Length", EDITS, multipart, *image, declared=True),
    )


@dataclass
class HugeResult:
    body: HugeBody
    answer: str = ""
    sent_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class HugePhase:
    size: int
    idle_rss: int
    rss: RssSamples
    settled_rss: int | None  # None: the server process is gone
    results: list[HugeResult]
    stopped_at_cap: bool


async def _send(http: httpx.AsyncClient, body: HugeBody, size: int, result: HugeResult, timeout_s: float) -> None:
    headers = {"content-type": body.content_type} | ({"content-length": str(size)} if body.declared else {})
    started = time.perf_counter()
    try:
        response = await asyncio.wait_for(
            http.post(body.path, content=body.chunks(size, result), headers=headers), timeout_s
        )
        answer = http_answer(response)
        result.answer = f"{answer.label} {answer.error.get('code') if answer.error else ''}".strip()
    except TimeoutError:
        result.answer = f"no answer within {timeout_s:g} s"
    except CLIENT_FAILURES as failure:
        result.answer = f"{type(failure).__name__} (no answer)"
    finally:  # also when the phase stops this client
        result.seconds = time.perf_counter() - started


async def send_huge_bodies(
    base_url: str, pid: int, *, size: int, timeout_s: float, rss_cap_bytes: int, settle_s: float
) -> HugePhase:
    """All four bodies at once; if the server's RSS grows past ``rss_cap_bytes`` above idle, the
    clients are stopped (their answer says so) rather than letting the machine run out of memory."""
    idle = rss_bytes(pid)
    results = [HugeResult(body) for body in huge_bodies()]
    limits = httpx.Limits(max_connections=len(results))
    async with (
        httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as http,
        sampled(pid, 0.05, cap_bytes=idle + rss_cap_bytes) as rss,
    ):
        senders = asyncio.gather(*(_send(http, result.body, size, result, timeout_s) for result in results))
        alarm = asyncio.ensure_future(rss.alarm.wait())
        await asyncio.wait({senders, alarm}, return_when=asyncio.FIRST_COMPLETED)
        stopped = not senders.done()
        alarm.cancel()
        if stopped:
            senders.cancel()
            await asyncio.gather(senders, return_exceptions=True)
            for result in results:
                if not result.answer:
                    result.answer = f"stopped by the soak: server RSS passed +{rss_cap_bytes // MB} MB"
    await asyncio.sleep(settle_s)
    try:
        settled: int | None = rss_bytes(pid)
    except (FileNotFoundError, ProcessLookupError):
        settled = None
    return HugePhase(size, idle, rss, settled, results, stopped)
