"""``make soak``: many clients mixing every kind of request against one real server, then huge bodies.

Starts ``diffuser-api serve`` (tiny-sd, a small queue so 429s happen), warms it up with the
mix, and runs the mix for ``--seconds`` while sampling the server's RSS; then four clients
stream huge bodies while its RSS is sampled again. Writes bench/results/soak.md. Every loop
is bounded in time and count, and everything talks to 127.0.0.1 only.

    python bench/soak.py                         # 64 clients, 60 s, 1 GB bodies
    python bench/soak.py --clients 8 --seconds 10 --huge-bytes 50000000   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ are importable from the root

import httpx
from tests.conftest import LiveServer

from bench import soak_report
from bench.huge_bodies import send_huge_bodies
from bench.load import GENERATIONS, payload
from bench.measure import cpu_pressure
from bench.rss import MB, rss_bytes, sampled
from bench.run import served
from bench.soak_mix import Outcome, run_mix
from bench.soak_report import ServerRun, SoakResults

SETTLE_S = 3.0  # after load stops, before RSS is read: in-flight work and its buffers finish


async def soak(server: LiveServer, args: argparse.Namespace) -> SoakResults:
    pid = server.process.pid
    steps = (args.min_steps, args.max_steps)

    async def mix(seconds: float, seed: int) -> list[Outcome]:
        return await run_mix(server.base_url, clients=args.clients, seconds=seconds, side=args.side, steps=steps,
                             seed=seed, max_requests_per_client=args.max_requests_per_client,
                             timeout_s=args.request_timeout_s)

    phases: dict[str, datetime.datetime] = {}

    def phase(name: str, what: str) -> None:
        phases[name] = datetime.datetime.now()
        print(f"{phases[name]:%H:%M:%S} {name}: {what} ...", flush=True)

    idle = rss_bytes(pid)
    phase("warm-up", f"{args.clients} clients, {args.warmup_seconds:g} s")
    await mix(args.warmup_seconds, seed=1)
    await asyncio.sleep(SETTLE_S)
    warm = rss_bytes(pid)
    phase("soak", f"{args.clients} clients, {args.seconds:g} s")
    async with sampled(pid, 1.0) as during:
        outcomes = await mix(args.seconds, seed=2)
    await asyncio.sleep(SETTLE_S)
    end = rss_bytes(pid)
    phase("huge bodies", f"4 clients, {args.huge_bytes / 1e6:g} MB each")
    huge = await send_huge_bodies(server.base_url, pid, size=args.huge_bytes, timeout_s=args.huge_timeout_s,
                                  rss_cap_bytes=args.huge_rss_cap_mb * MB, settle_s=SETTLE_S)
    phase("final check", "one plain generation")
    serves_after = await _serves(server)
    return SoakResults(outcomes=outcomes, idle_rss=idle, warm_rss=warm, soak_rss=during, end_rss=end, huge=huge,
                       serves_after=serves_after, phases=phases)


async def _serves(server: LiveServer) -> str:
    """Whether a plain generation still works after everything: its status, or why not."""
    if server.process.poll() is not None:
        return f"no: the server exited with {server.process.returncode}"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        try:
            response = await http.post(GENERATIONS, json=payload(64, 2))
        except httpx.HTTPError as failure:
            return f"no: {type(failure).__name__}"
    return "yes (200)" if response.status_code == 200 else f"no: {response.status_code}"


def _server_run(server: LiveServer) -> ServerRun:
    exit_code = server.stop()
    log = server.log.read_text(errors="replace").splitlines()
    return ServerRun(exit_code=exit_code, exceptions=raised_exceptions(log),
                     error_lines=[line for line in log if " ERROR " in line])


def raised_exceptions(log: list[str]) -> list[str]:
    """The exception line that ends each traceback in the log (a chained one has a traceback per link)."""
    found, inside = [], False
    for line in log:
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line and not line[0].isspace():
            found.append(line)
            inside = False
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup-seconds", type=float, default=None, help="default: a sixth of --seconds, ≥ 3")
    parser.add_argument("--queue-size", type=int, default=8, help="DIFFUSER_MAX_QUEUE_SIZE, small so 429s happen")
    parser.add_argument("--side", type=int, default=64, help="image width and height")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--request-timeout-s", type=float, default=60.0)
    parser.add_argument("--max-requests-per-client", type=int, default=10_000)
    parser.add_argument("--huge-bytes", type=int, default=10**9, help="size of each of the 4 huge bodies")
    parser.add_argument("--huge-timeout-s", type=float, default=300.0)
    parser.add_argument("--huge-rss-cap-mb", type=int, default=3000,
                        help="stop the huge-body clients once the server's RSS is this far above idle")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.md")
    args = parser.parse_args()
    if args.warmup_seconds is None:
        args.warmup_seconds = max(3.0, args.seconds / 6)
    started = datetime.datetime.now()
    pressure_before = cpu_pressure()
    with (
        tempfile.TemporaryDirectory(prefix="diffuser-soak-") as scratch,
        served(Path(scratch), DIFFUSER_MAX_QUEUE_SIZE=str(args.queue_size)) as server,
    ):
        results = asyncio.run(soak(server, args))
        server_run = _server_run(server)
    notes = [
        (f"{started:%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores shared with other work; before: {pressure_before}; "
         f"after: {cpu_pressure()}"),
        (f"`python bench/soak.py --clients {args.clients} --seconds {args.seconds:g}` (warm-up "
         f"{args.warmup_seconds:g} s), tiny-sd, {args.side}x{args.side}, {args.min_steps}–{args.max_steps} steps, "
         f"`DIFFUSER_MAX_QUEUE_SIZE={args.queue_size}`, other settings at their defaults"),
    ]
    text = soak_report.markdown(results, server_run, notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
