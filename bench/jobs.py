"""Async jobs beside interactive traffic, on tiny-sd: do interactive requests stay fast while
a burst of jobs is queued, how many jobs per second go through, and do all of them finish.

Starts one ``diffuser-api serve`` (its own SQLite jobs database), measures interactive latency
alone, then submits ``--jobs`` async jobs and runs the same interactive load at once. Prints a
Markdown table; the target is interactive p95 with jobs <= 1.5 x alone (it needs the engine's
priority classes: without them, jobs and interactive requests share one FIFO queue).

    python bench/jobs.py                      # 200 jobs, 16 interactive clients
    python bench/jobs.py --jobs 10 --clients 2 --requests 8   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ are importable from the root

import httpx
from tests.conftest import LiveServer

from bench import load

RESULTS = ROOT / "bench" / "results"
SIDE, STEPS = 64, 4
TARGET_RATIO = 1.5
FINAL = ("completed", "failed", "cancelled", "expired")


def p95(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]


async def submit_jobs(base_url: str, count: int) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async def one(index: int) -> str:
            response = await client.post(load.GENERATIONS, headers={"Prefer": "respond-async"},
                                         json={**load.payload(SIDE, STEPS), "seed": index})
            response.raise_for_status()
            return response.json()["id"]

        return list(await asyncio.gather(*(one(index) for index in range(count))))


async def wait_jobs(base_url: str, ids: list[str], timeout_s: float) -> dict[str, dict]:
    """Every job object as it ended (or as it is at the deadline). While waiting it asks only
    whether any job is still queued or running (one short page each), as a client waiting for
    its jobs would: listing all of them every time would send every finished job's images
    (base64) again, a load of its own on the cores the interactive requests use."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        while time.monotonic() < deadline:
            pending = [(await client.get("/v1/images/jobs", params={"status": status, "limit": 1})).json()["data"]
                       for status in ("queued", "in_progress")]
            if not any(pending):
                break
            await asyncio.sleep(0.5)
        found, after = {}, None
        while True:
            params = {"limit": 100} | ({"after": after} if after else {})
            page = (await client.get("/v1/images/jobs", params=params)).json()
            found |= {job["id"]: job for job in page["data"]}
            if not page["has_more"]:
                break
            after = page["last_id"]
    return {job_id: found.get(job_id, {"status": "missing", "completed_at": None}) for job_id in ids}


async def with_jobs(base_url: str, jobs: int, clients: int, requests: int, timeout_s: float):
    """Also how many jobs finished while the interactive clients ran: with the engine's priority
    classes, jobs run in the gaps interactive traffic leaves (and once aged), so under a
    saturating interactive load most of them wait for it to end."""
    started = time.perf_counter()
    ids = await submit_jobs(base_url, jobs)
    interactive = asyncio.create_task(load.drive(base_url, [load.payload(SIDE, STEPS)] * requests, clients))
    interactive_ended: list[float] = []
    interactive.add_done_callback(lambda _: interactive_ended.append(time.time()))
    ended = await wait_jobs(base_url, ids, timeout_s)
    jobs_s = time.perf_counter() - started
    latencies, failures = await interactive
    during = sum(job["completed_at"] is not None and job["completed_at"] <= int(interactive_ended[0])
                 for job in ended.values())
    return latencies, failures, {job_id: job["status"] for job_id, job in ended.items()}, jobs_s, during


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256,
                        help="interactive requests per phase (16 per client: a p95 of 64 would be its 3 slowest)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="longest wait for the jobs, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = LiveServer(Path(folder), DIFFUSER_JOB_POLL_S="0.2")
        try:
            server.wait_ready()
            body = load.payload(SIDE, STEPS)
            asyncio.run(load.drive(server.base_url, [body] * args.clients, args.clients))  # warm-up
            alone, alone_failures = asyncio.run(load.drive(server.base_url, [body] * args.requests, args.clients))
            mixed, mixed_failures, statuses, jobs_s, during = asyncio.run(
                with_jobs(server.base_url, args.jobs, args.clients, args.requests, args.timeout)
            )
        finally:
            server.stop()
    completed = sum(status == "completed" for status in statuses.values())
    ratio = p95(mixed) / p95(alone)
    table = [
        f"## Async jobs beside interactive traffic (tiny-sd, {SIDE}x{SIDE}, {STEPS} steps, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)\n",
        "| measure | value |\n|---|---|",
        f"| interactive p95 alone ({args.clients} clients) | {p95(alone):.3f} s |",
        f"| interactive p95 with {args.jobs} jobs queued | {p95(mixed):.3f} s |",
        f"| ratio (target <= {TARGET_RATIO}) | {ratio:.2f} {'met' if ratio <= TARGET_RATIO else 'NOT met'} |",
        f"| interactive failures (alone, with jobs) | {alone_failures}, {mixed_failures} |",
        f"| jobs finished | {completed} / {args.jobs} completed |",
        f"| jobs finished while the interactive clients ran (to the second) | {during} / {args.jobs} |",
        f"| jobs per second (submission to the last one finished) | {args.jobs / jobs_s:.2f} |",
    ]
    print("\n".join(table))
    (RESULTS / "jobs.md").write_text("\n".join(table) + "\n")
    if completed != args.jobs:
        others = sorted({status for status in statuses.values() if status != "completed"})
        print(f"\nNot completed: {others}")
        sys.exit(1)


if __name__ == "__main__":
    main()
