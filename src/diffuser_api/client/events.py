"""Following a job's events (``GET /v1/images/jobs/{id}/events``, SSE) until its outcome.

The job does not depend on the connection: leaving (Ctrl-C) or losing the stream leaves it
running, and attaching again replays its state first, so a broken stream is simply reopened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from diffuser_api.client.failures import ConnectionFailed, refusal_from
from diffuser_api.client.http import TIMEOUT, describe, job_path
from diffuser_api.client.server import Server

JobEventHandler = Callable[[dict[str, Any]], None]
FINAL_EVENTS = frozenset({"image.job.completed", "image.job.failed", "image.job.cancelled"})
# Streams that end early in a row before giving up (each reattach replays the job's state).
MAX_REATTACHES = 3


def follow_job(server: Server, job_id: str, on_event: JobEventHandler) -> dict[str, Any]:
    """Pass each event before the final one to ``on_event``; return the job of the final one."""
    broken = 0
    while True:
        try:
            final = _follow_once(server, job_id, on_event)
        except (httpx.RemoteProtocolError, httpx.ReadError) as error:
            final, reason = None, describe(error)
        else:
            reason = "the stream ended before the job did"
        if final is not None:
            return final
        broken += 1
        if broken > MAX_REATTACHES:
            raise ConnectionFailed(f"lost the events of job {job_id}: {reason}")


def _follow_once(server: Server, job_id: str, on_event: JobEventHandler) -> dict[str, Any] | None:
    url = server.url(f"{job_path(job_id)}/events")
    try:
        with (httpx.Client(headers=server.headers, timeout=TIMEOUT) as client,
              client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response):
            if response.is_error:
                response.read()
                raise refusal_from(_json_of(response.content), response.status_code)
            for name, data in sse_events(response.iter_lines()):
                if name == "error":
                    raise refusal_from(data, None)
                if name in FINAL_EVENTS:
                    return data["job"]
                on_event(data)
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        raise ConnectionFailed(f"could not reach the server at {server.api_base}: {describe(error)}") from None
    return None


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """``(event name, parsed data)`` per event; comments (the server's pings) are skipped."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))


def _json_of(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
