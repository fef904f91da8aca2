"""``make bench``: tiny-sd called directly vs. served over HTTP, on this machine, in one run.

Starts and stops two servers itself (the ``diffuser-api serve`` process the integration tests
use): one with the default batching, one with ``DIFFUSER_MAX_BATCH_SIZE=1``. Compared phases
run in many short rounds, back to back, and each ratio is the median of the rounds' ratios
with its bootstrap interval (``bench.paired``): the shared machine's speed drifts between
minutes, not within a round. Writes bench/results/latest.md and bench/results/throughput.png.
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
from dataclasses import dataclass
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
from bench.paired import PairedRatio, alternating_rounds
from diffuser_api.config import Settings

CLIENT_COUNTS = (1, 2, 4, 8, 16, 32)
LATENCY_SIZE, LATENCY_STEPS = 256, 20
THROUGHPUT_SIZE, THROUGHPUT_STEPS = 64, 4
CONCURRENT_CLIENTS = 16
DISCONNECT_SIZE, DISCONNECT_STEPS = 512, 200
LATENCY_ROUNDS = 24  # one direct call and one served request each
THROUGHPUT_ROUNDS = 12


@contextlib.contextmanager
def served(scratch: Path, **env: str) -> Iterator[LiveServer]:
    server = LiveServer(scratch, **env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class Rounds:
    """What each phase measured in each round."""

    parts: dict[str, list[Measurement]]

    def pooled(self, phase: str) -> Measurement:
        return Measurement.pooled(self.parts[phase])

    def paired(self, baseline: str, candidate: str, value: Callable[[Measurement], float]) -> PairedRatio:
        """``value`` of the candidate phase over the baseline's, round by round."""
        return PairedRatio.of([(value(base), value(other))
                               for base, other in zip(self.parts[baseline], self.parts[candidate], strict=True)])


def interleaved(phases: dict[str, Callable[[], Measurement]], rounds: int) -> Rounds:
    return Rounds(alternating_rounds(phases, rounds))


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
        """Measured rounds skip the warm-up: ``warm_up`` ran before them."""
        return lambda: load.run_clients(server.base_url, label, side=side, steps=steps, clients=clients,
                                        requests=requests, batch=batch, server_pid=server.process.pid,
                                        warmup_requests=0)

    def warm_up(server: LiveServer, side: int, steps: int, clients: int) -> None:
        load.run_clients(server.base_url, "warm-up", side=side, steps=steps, clients=clients,
                         requests=2 * clients, batch=1)

    def direct_phase(label: str, batch: int, side: int, steps: int, calls: int) -> Callable[[], Measurement]:
        return lambda: direct.measure(label, batch=batch, side=side, steps=steps, calls=calls, warm_up=False)

    direct = DirectPipeline.tiny(TINY_CACHE)
    step_s = direct.step_time_s(DISCONNECT_SIZE, 10)
    # The disconnect probe's request is longer than the default DIFFUSER_MAX_STEPS allows.
    with served(scratch, DIFFUSER_MAX_STEPS=str(DISCONNECT_STEPS)) as batching, \
            served(scratch, DIFFUSER_MAX_BATCH_SIZE="1") as unbatched:
        print("latency: direct vs. 1 client ...", flush=True)
        direct.warm_up(1, LATENCY_SIZE, LATENCY_STEPS)
        warm_up(batching, LATENCY_SIZE, LATENCY_STEPS, 1)
        latency = interleaved({
            "direct": direct_phase("direct, 1 image per call", 1, LATENCY_SIZE, LATENCY_STEPS, 1),
            "served": clients_phase(batching, "served, 1 sequential client", LATENCY_SIZE, LATENCY_STEPS, 1, 1,
                                    max_batch),
        }, count(LATENCY_ROUNDS))
        print(f"throughput: direct vs. {CONCURRENT_CLIENTS} clients ...", flush=True)
        for batch in (1, max_batch):
            direct.warm_up(batch, THROUGHPUT_SIZE, THROUGHPUT_STEPS)
        for server in (batching, unbatched):
            warm_up(server, THROUGHPUT_SIZE, THROUGHPUT_STEPS, CONCURRENT_CLIENTS)
        throughput = interleaved({
            "single": direct_phase("direct, 1 image per call", 1, THROUGHPUT_SIZE, THROUGHPUT_STEPS, count(3)),
            "batched": direct_phase(f"direct, batches of {max_batch}", max_batch, THROUGHPUT_SIZE, THROUGHPUT_STEPS,
                                    count(4)),
            "on": clients_phase(batching, f"served, {CONCURRENT_CLIENTS} clients, batching on", THROUGHPUT_SIZE,
                                THROUGHPUT_STEPS, CONCURRENT_CLIENTS, count(4 * CONCURRENT_CLIENTS), max_batch),
            "off": clients_phase(unbatched, f"served, {CONCURRENT_CLIENTS} clients, batching off", THROUGHPUT_SIZE,
                                 THROUGHPUT_STEPS, CONCURRENT_CLIENTS, count(2 * CONCURRENT_CLIENTS), 1),
        }, count(THROUGHPUT_ROUNDS))
        print("clients sweep ...", flush=True)
        sweep_on, sweep_off = [], []
        for clients in CLIENT_COUNTS:
            requests = count(max(48, 6 * clients))
            for server, batch, sweep in ((batching, max_batch, sweep_on), (unbatched, 1, sweep_off)):
                sweep.append(load.run_clients(server.base_url, f"{clients} clients", side=THROUGHPUT_SIZE,
                                              steps=THROUGHPUT_STEPS, clients=clients, requests=requests,
                                              batch=batch, server_pid=server.process.pid))
        print("previews ...", flush=True)
        previews = preview_bench.measure_overhead(batching.base_url, batching.process.pid, "latent", count(40))
        print("disconnects ...", flush=True)
        busy = busy_after_disconnect_s(batching.base_url, side=DISCONNECT_SIZE, steps=DISCONNECT_STEPS,
                                       give_up_s=1.5, repeats=5)

    latency_ratio = latency.paired("direct", "served", lambda phase: phase.p50_ms)
    throughput_ratio = throughput.paired("batched", "on", lambda phase: phase.images_per_s)
    batching_ratio = throughput.paired("off", "on", lambda phase: phase.images_per_s)
    busy_steps = statistics.median(busy) / step_s
    targets = [
        Target(f"served / direct latency, 1 client, {LATENCY_SIZE}², {LATENCY_STEPS} steps "
               f"({latency_ratio.summary()})", latency_ratio.median, "≤ 1.05", latency_ratio.median <= 1.05),
        Target(f"served {CONCURRENT_CLIENTS} clients / direct batched throughput, {THROUGHPUT_SIZE}², "
               f"{THROUGHPUT_STEPS} steps ({throughput_ratio.summary()})", throughput_ratio.median, "≥ 0.85",
               throughput_ratio.median >= 0.85),
        Target(f"batching on / off throughput, {CONCURRENT_CLIENTS} clients ({batching_ratio.summary()})",
               batching_ratio.median, "≥ 3", batching_ratio.median >= 3),
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
        (f"Direct and served phases ran in back-to-back rounds ({count(LATENCY_ROUNDS)} for latency, "
         f"{count(THROUGHPUT_ROUNDS)} for throughput; the order reversed every other round); each row above "
         "pools its rounds, each ratio is the median of the rounds' ratios with a bootstrap 95 % interval."),
        ("The load generator (asyncio, prepared HTTP/1.1 requests on keep-alive connections) runs on the "
         "same cores as the server; its CPU column is "
         "what it took from them."),
        ("Busy after a disconnect: latency of a 1-step 64² probe sent right after a client abandons a "
         f"{DISCONNECT_SIZE}² request, minus the probe's latency on an idle server."),
    ]
    results = report.Results(
        phases=[latency.pooled("direct"), latency.pooled("served"), throughput.pooled("single"),
                throughput.pooled("batched"), throughput.pooled("on"), throughput.pooled("off")],
        sweep_on=sweep_on, sweep_off=sweep_off, targets=targets, notes=notes,
    )
    report.write(results, args.out)
    print(report.markdown(results))


if __name__ == "__main__":
    main()
