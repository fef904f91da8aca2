"""A closed-loop load generator: N clients, each sending its next request as soon as the last
one answers, until a fixed number of requests is done. asyncio over plain HTTP/1.1 keep-alive
connections, loopback only.

On a small machine the load generator competes with the server for the same cores, so it has
to cost as little as the measurement allows (as wrk or h2load do in C): httpx took about 2 ms of
CPU per request here, which is 8 % of what a 64x64 image costs the pipeline; writing a prepared
request and reading the answer by its Content-Length takes about 0.2 ms. Its own CPU time is
still measured and reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from bench.measure import Measurement, process_cpu_s

GENERATIONS = "/v1/images/generations"


def payload(side: int, steps: int) -> dict[str, Any]:
    return {"prompt": "a watercolor fox", "size": f"{side}x{side}", "num_inference_steps": steps, "seed": 1}


class KeepAliveConnection:
    """One client's HTTP/1.1 connection: POSTs JSON, returns the status and the body's bytes
    (read, never parsed: a client that shows the image would decode it, on its own machine)."""

    def __init__(self, base_url: str) -> None:
        address = urlsplit(base_url)
        self._host, self._port = address.hostname or "127.0.0.1", address.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        content = json.dumps(body).encode()
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(content)}\r\n\r\n".encode() + content)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = {name.strip().lower(): value.strip().lower()
                   for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
        if b"content-length" in headers:
            data = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            data = await self._chunks(reader)
        else:
            raise RuntimeError(f"an answer with neither Content-Length nor chunks: {head!r}")
        if headers.get(b"connection") == b"close":
            await self.close()
        return status, data

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        data = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            data += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # the empty trailer
        return bytes(data)

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            await writer.wait_closed()


async def drive(
    base_url: str, bodies: Sequence[dict[str, Any]], clients: int, timeout_s: float = 120.0
) -> tuple[list[float], int]:
    """``clients`` closed-loop clients working through ``bodies`` in order: the latencies of the
    200s, and how many answers were not 200."""
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(bodies))

    async def one_client() -> None:
        nonlocal failures
        connection = KeepAliveConnection(base_url)
        try:
            while queue:
                request = queue.pop()
                started = time.perf_counter()
                status, _ = await asyncio.wait_for(connection.post(GENERATIONS, request), timeout_s)
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1
        finally:
            await connection.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, failures


def run_clients(
    base_url: str,
    label: str,
    *,
    side: int,
    steps: int,
    clients: int,
    requests: int,
    batch: int,
    server_pid: int | None = None,
    warmup_requests: int | None = None,
) -> Measurement:
    """Warm up (one request per client unless told), then measure ``requests`` requests.

    CPU figures need the server in another process (``server_pid``): in one process they
    cannot be told apart.
    """
    body = payload(side, steps)
    warmup = clients if warmup_requests is None else warmup_requests
    if warmup:
        asyncio.run(drive(base_url, [body] * warmup, clients))
    server_cpu = process_cpu_s(server_pid) if server_pid else None
    own_cpu = time.process_time()
    started = time.perf_counter()
    latencies, failures = asyncio.run(drive(base_url, [body] * requests, clients))
    wall = time.perf_counter() - started
    return Measurement(
        label, side, steps, clients=clients, batch=batch, images=len(latencies), wall_s=wall,
        latencies_s=tuple(latencies), failures=failures,
        load_cpu_s=time.process_time() - own_cpu if server_pid else None,
        server_cpu_s=process_cpu_s(server_pid) - server_cpu if server_pid and server_cpu is not None else None,
    )
