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


async def wait_jobs(base_url: str, ids: list[str], timeout_s: float) -> dict[str, str]:
    """Every job's final status (polling the list, newest first), or what it is at the deadline."""
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        while time.monotonic() < deadline:
            statuses, after = {}, None
            while True:
                params = {"limit": 100} | ({"after": after} if after else {})
                page = (await client.get("/v1/images/jobs", params=params)).json()
                statuses |= {job["id"]: job["status"] for job in page["data"]}
                if not page["has_more"]:
                    break
                after = page["last_id"]
            if all(statuses.get(job_id) in FINAL for job_id in ids):
                break
            await asyncio.sleep(0.5)
    return {job_id: statuses.get(job_id, "missing") for job_id in ids}


async def with_jobs(base_url: str, jobs: int, clients: int, requests: int, timeout_s: float):
    started = time.perf_counter()
    ids = await submit_jobs(base_url, jobs)
    interactive = asyncio.create_task(load.drive(base_url, [load.payload(SIDE, STEPS)] * requests, clients))
    statuses = await wait_jobs(base_url, ids, timeout_s)
    jobs_s = time.perf_counter() - started
    latencies, failures = await interactive
    return latencies, failures, statuses, jobs_s


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
            mixed, mixed_failures, statuses, jobs_s = asyncio.run(
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
