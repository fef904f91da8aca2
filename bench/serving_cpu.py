"""The served/direct gap by CPU time: what serving adds per image, measured where wall-clock
ratios cannot be (cores crowded by other work).

On a machine whose cores are all busy with the model, throughput is CPU per image: served /
direct throughput ≈ direct CPU per image / (server + load generator) CPU per image. (Single
requests are too few and too short for CPU time on crowded cores: a first try put the served
request below the direct call, which it cannot be.) Both sides run torch on
one thread (``OMP_NUM_THREADS=1`` for the server, ``torch.set_num_threads(1)`` here) so no
spinning second thread is counted. Same sizes as ``bench/run.py``.
Run: python bench/serving_cpu.py [--scale F] (writes bench/results/serving_cpu.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import TINY_CACHE, LiveServer

from bench import load
from bench.direct import DirectPipeline
from bench.run import CONCURRENT_CLIENTS, THROUGHPUT_SIZE, THROUGHPUT_STEPS

BATCH = 8


def direct_cpu_per_image_s(direct: DirectPipeline, batch: int, side: int, steps: int, calls: int) -> float:
    direct._call(batch, side, steps)  # warm-up
    started = time.process_time()
    for _ in range(calls):
        direct._call(batch, side, steps)
    return (time.process_time() - started) / (calls * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default request counts")
    args = parser.parse_args()

    def count(base: int) -> int:
        return max(3, round(base * args.scale))

    torch.set_num_threads(1)
    direct = DirectPipeline.tiny(TINY_CACHE)
    batched_direct = direct_cpu_per_image_s(direct, BATCH, THROUGHPUT_SIZE, THROUGHPUT_STEPS, count(12))
    with tempfile.TemporaryDirectory() as scratch:
        server = LiveServer(Path(scratch), OMP_NUM_THREADS="1")
        try:
            server.wait_ready()
            pid = server.process.pid
            many = load.run_clients(server.base_url, f"{CONCURRENT_CLIENTS} clients", side=THROUGHPUT_SIZE,
                                    steps=THROUGHPUT_STEPS, clients=CONCURRENT_CLIENTS,
                                    requests=count(12 * CONCURRENT_CLIENTS), batch=BATCH, server_pid=pid)
        finally:
            server.stop()
    assert many.server_cpu_s is not None and many.load_cpu_s is not None
    many_server = many.server_cpu_s / many.images
    many_client = many.load_cpu_s / many.images
    throughput_server_only = batched_direct / many_server
    throughput_with_client = batched_direct / (many_server + many_client)
    report = (
        "# Served / direct by CPU time (tiny-sd, one torch thread each side)\n\n"
        "| case | direct CPU per image | served CPU per image | estimate | target |\n|---|---|---|---|---|\n"
        f"| {CONCURRENT_CLIENTS} clients, {THROUGHPUT_SIZE}², {THROUGHPUT_STEPS} steps, batches of {BATCH} | "
        f"{batched_direct * 1000:.2f} ms | {many_server * 1000:.2f} ms (server) + {many_client * 1000:.2f} ms "
        f"(load generator) | throughput ratio {throughput_server_only:.2f} (server alone), "
        f"{throughput_with_client:.2f} (with the load generator on the same cores) | ≥ 0.85 |\n\n"
        f"Requests: {many.images}; {many.failures} failures. These are estimates for a "
        "machine whose cores the model keeps busy; the wall-clock ratios of `bench/run.py` are the "
        "measurement where the cores are not crowded by other work.\n"
    )
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "serving_cpu.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
