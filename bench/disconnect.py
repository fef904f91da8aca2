"""How long a request whose client has gone keeps the worker busy.

A client starts a long generation and gives up; right after it closes the connection, a probe
request is sent. The probe waits for the worker, so its latency minus its latency on an idle
server is the time the worker spent on the abandoned request after the client left.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from bench.load import GENERATIONS, payload


def _latency_s(base_url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{base_url}{GENERATIONS}", json=body, timeout=120)
    response.raise_for_status()
    return time.perf_counter() - started


def _abandon(base_url: str, body: dict[str, Any], after_s: float) -> None:
    with httpx.Client(timeout=after_s) as client:
        try:
            client.post(f"{base_url}{GENERATIONS}", json=body)
        except httpx.ReadTimeout:
            return
    raise RuntimeError(f"the long request finished within {after_s} s; make it longer")


def busy_after_disconnect_s(base_url: str, *, side: int, steps: int, give_up_s: float, repeats: int) -> list[float]:
    probe = payload(64, 1)
    idle = statistics.median(_latency_s(base_url, probe) for _ in range(5))
    busy = []
    for _ in range(repeats):
        _abandon(base_url, payload(side, steps), give_up_s)
        busy.append(max(0.0, _latency_s(base_url, probe) - idle))
    return busy
