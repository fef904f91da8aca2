"""``make bench``: tiny-sd called directly vs. served over HTTP, on this machine, in one run.

Starts and stops two servers itself (the ``diffuser-api serve`` process the integration tests
use): one with the default batching, one with ``DIFFUSER_MAX_BATCH_SIZE=1``. Compared phases
run in interleaved rounds, so a burst of other work on a shared machine lands on both sides
of a ratio rather than on one. Writes bench/results/latest.md and bench/results/throughput.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ are importable from the root

import diffusers
import torch
from tests.conftest import TINY_CACHE, LiveServer

from bench import load, report
from bench import previews as preview_bench
from bench.direct import DirectPipeline
from bench.disconnect import busy_after_disconnect_s
from bench.measure import Measurement, Target, cpu_pressure
from diffuser_api.config import Settings

CLIENT_COUNTS = (1, 2, 4, 8, 16, 32)
LATENCY_SIZE, LATENCY_STEPS = 256, 20
THROUGHPUT_SIZE, THROUGHPUT_STEPS = 64, 4
CONCURRENT_CLIENTS = 16
DISCONNECT_SIZE, DISCONNECT_STEPS = 512, 200
ROUNDS = 3


@contextlib.contextmanager
def served(scratch: Path, **env: str) -> Iterator[LiveServer]:
    server = LiveServer(scratch, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def interleaved(phases: dict[str, Callable[[], Measurement]], rounds: int) -> dict[str, Measurement]:
    """Run every phase once per round, in turn, and pool each phase's rounds."""
    parts: dict[str, list[Measurement]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, phase in phases.items():
            parts[name].append(phase())
    return {name: Measurement.pooled(measured) for name, measured in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default request counts")
    args = parser.parse_args()
    defaults = Settings(_env_file=None)
    max_batch = defaults.max_batch_size
    pressure_before = cpu_pressure()
    scratch = Path(tempfile.mkdtemp(prefix="diffuser-bench-"))

    def count(base: int) -> int:
        return max(3, round(base * args.scale))

    def clients_phase(server: LiveServer, label: str, side: int, steps: int, clients: int, requests: int,
                      batch: int) -> Callable[[], Measurement]:
        return lambda: load.run_clients(server.base_url, label, side=side, steps=steps, clients=clients,
                                        requests=requests, batch=batch, server_pid=server.process.pid)

    direct = DirectPipeline.tiny(TINY_CACHE)
    step_s = direct.step_time_s(DISCONNECT_SIZE, 10)
    # The disconnect probe's request is longer than the default DIFFUSER_MAX_STEPS allows.
    with served(scratch, DIFFUSER_MAX_STEPS=str(DISCONNECT_STEPS)) as batching, \
            served(scratch, DIFFUSER_MAX_BATCH_SIZE="1") as unbatched:
        print("latency: direct vs. 1 client ...", flush=True)
        latency = interleaved({
            "direct": lambda: direct.measure("direct, 1 image per call", batch=1, side=LATENCY_SIZE,
                                             steps=LATENCY_STEPS, calls=count(8)),
            "served": clients_phase(batching, "served, 1 sequential client", LATENCY_SIZE, LATENCY_STEPS, 1,
                                    count(8), max_batch),
        }, ROUNDS)
        print(f"throughput: direct vs. {CONCURRENT_CLIENTS} clients ...", flush=True)
        many = count(12 * CONCURRENT_CLIENTS)
        throughput = interleaved({
            "single": lambda: direct.measure("direct, 1 image per call", batch=1, side=THROUGHPUT_SIZE,
                                             steps=THROUGHPUT_STEPS, calls=count(30)),
            "batched": lambda: direct.measure(f"direct, batches of {max_batch}", batch=max_batch,
                                              side=THROUGHPUT_SIZE, steps=THROUGHPUT_STEPS, calls=count(12)),
            "on": clients_phase(batching, f"served, {CONCURRENT_CLIENTS} clients, batching on", THROUGHPUT_SIZE,
                                THROUGHPUT_STEPS, CONCURRENT_CLIENTS, many, max_batch),
            "off": clients_phase(unbatched, f"served, {CONCURRENT_CLIENTS} clients, batching off", THROUGHPUT_SIZE,
                                 THROUGHPUT_STEPS, CONCURRENT_CLIENTS, many, 1),
        }, ROUNDS)
        print("clients sweep ...", flush=True)
        sweep_on, sweep_off = [], []
        for clients in CLIENT_COUNTS:
            requests = count(max(48, 6 * clients))
            for server, batch, sweep in ((batching, max_batch, sweep_on), (unbatched, 1, sweep_off)):
                sweep.append(clients_phase(server, f"{clients} clients", THROUGHPUT_SIZE, THROUGHPUT_STEPS,
                                           clients, requests, batch)())
        print("previews ...", flush=True)
        previews = preview_bench.measure_overhead(batching.base_url, batching.process.pid, "latent", count(40))
        print("disconnects ...", flush=True)
        busy = busy_after_disconnect_s(batching.base_url, side=DISCONNECT_SIZE, steps=DISCONNECT_STEPS,
                                       give_up_s=1.5, repeats=5)

    latency_ratio = latency["served"].p50_ms / latency["direct"].p50_ms
    throughput_ratio = throughput["on"].images_per_s / throughput["batched"].images_per_s
    batching_ratio = throughput["on"].images_per_s / throughput["off"].images_per_s
    busy_steps = statistics.median(busy) / step_s
    targets = [
        Target(f"served / direct latency, 1 client, {LATENCY_SIZE}², {LATENCY_STEPS} steps (p50)",
               latency_ratio, "≤ 1.05", latency_ratio <= 1.05),
        Target(f"served {CONCURRENT_CLIENTS} clients / direct batched throughput, {THROUGHPUT_SIZE}², "
               f"{THROUGHPUT_STEPS} steps", throughput_ratio, "≥ 0.85", throughput_ratio >= 0.85),
        Target(f"batching on / off throughput, {CONCURRENT_CLIENTS} clients", batching_ratio, "≥ 3",
               batching_ratio >= 3),
        Target(f"{preview_bench.PARTIALS} latent-map previews / none, streamed, {preview_bench.SIDE}², "
               f"{preview_bench.STEPS} steps ({previews.summary()})",
               1 + previews.ratio, f"≤ {1 + preview_bench.TARGET:.2f}", previews.ratio <= preview_bench.TARGET),
        Target(f"worker busy after a client disconnects, median of {len(busy)} "
               f"({DISCONNECT_SIZE}², step {step_s * 1000:.0f} ms; measured "
               f"{', '.join(f'{value * 1000:.0f}' for value in busy)} ms)",
               busy_steps, "≤ 1 step", busy_steps <= 1.0, unit=" steps"),
    ]
    notes = [
        (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores shared with other work; "
         f"before: {pressure_before}; after: {cpu_pressure()}"),
        (f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), diffusers {diffusers.__version__}, "
         f"server defaults (max batch {max_batch}, batch wait {defaults.batch_wait_ms:g} ms)"),
        f"Direct and served phases ran in {ROUNDS} interleaved rounds; each row pools its rounds.",
        ("The load generator (asyncio, prepared HTTP/1.1 requests on keep-alive connections) runs on the "
         "same cores as the server; its CPU column is "
         "what it took from them."),
        ("Busy after a disconnect: latency of a 1-step 64² probe sent right after a client abandons a "
         f"{DISCONNECT_SIZE}² request, minus the probe's latency on an idle server."),
    ]
    results = report.Results(
        phases=[latency["direct"], latency["served"], throughput["single"], throughput["batched"],
                throughput["on"], throughput["off"]],
        sweep_on=sweep_on, sweep_off=sweep_off, targets=targets, notes=notes,
    )
    report.write(results, args.out)
    print(report.markdown(results))


if __name__ == "__main__":
    main()
