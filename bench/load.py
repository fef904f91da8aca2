"""A closed-loop load generator: N clients, each sending its next request as soon as the last
one answers, until a fixed number of requests is done. asyncio + httpx, loopback only.

Its own CPU time is measured, because on a small machine it competes with the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.measure import Measurement, process_cpu_s

GENERATIONS = "/v1/images/generations"


def payload(side: int, steps: int) -> dict[str, Any]:
    return {"prompt": "a watercolor fox", "size": f"{side}x{side}", "num_inference_steps": steps, "seed": 1}


async def drive(
    base_url: str, bodies: Sequence[dict[str, Any]], clients: int, timeout_s: float = 120.0
) -> tuple[list[float], int]:
    """``clients`` closed-loop clients working through ``bodies`` in order: the latencies of the
    200s, and how many answers were not 200."""
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:

        async def one_client() -> None:
            nonlocal failures
            while queue:
                request = queue.pop()
                started = time.perf_counter()
                response = await client.post(GENERATIONS, json=request)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

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
