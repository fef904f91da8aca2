"""``make bench``, LoRA adapters: what alternating adapter sets cost a busy server, and what the
first use of an adapter (its load) costs a request.

Alternating sets: closed-loop clients send requests that alternate between two adapter sets
(``ink`` and ``neon``), against the very same requests all with one set (``ink``), on one server
(``diffuser-api serve``, tiny-sd with random LoRAs peft wrote in diffusers' format). Requests of
different sets never share a pipeline call (the set is part of the batch key) and switching
runs ``set_adapters`` between calls; the images/s ratio is what that costs (target ≥ 0.9).

First use: each round registers a fresh adapter name (``fresh-<n>``, a LoRA of the same shape)
and times the first request naming it (which loads it) and the next one (loaded), as multiples
of one pipeline call of the same size timed in this process (``bench/direct.py``).

Writes bench/results/loras.md and bench/results/loras.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ are importable from the root
os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # as bench/models.py: one regime for every process

import diffusers
import httpx
import matplotlib
import numpy as np
import torch
from tests.conftest import TINY_CACHE, LiveServer

from bench import tables
from bench.direct import PROMPT, DirectPipeline
from bench.load import GENERATIONS, drive
from bench.measure import Measurement, Target, cpu_pressure, process_cpu_s
from bench.run import interleaved, served
from diffuser_api.models.tiny.loras import ensure_tiny_lora

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

SIDE, STEPS = 64, 4
# The target is read at a load that keeps a backlog of both sets (four batches' worth of
# clients): it measures what switching costs the server. With few closed-loop clients each set
# has only half of them waiting, so its batches are smaller whatever the server does (a
# pipeline call never mixes adapter sets); that load is reported too.
CLIENTS = 32
FEW_CLIENTS = 8
ROUNDS = 3
FIRST_ROUNDS = 5
DIRECT_CALLS = 4
SETS = {"ink": [{"name": "ink"}], "neon": [{"name": "neon", "scale": 0.8}]}


def models_file(folder: Path, fresh: int) -> Path:
    """tiny-sd with ink, neon and ``fresh`` adapters never used before (one per first-use round)."""
    adapters = {"ink": ensure_tiny_lora("tiny-sd", 1, TINY_CACHE), "neon": ensure_tiny_lora("tiny-sd", 2, TINY_CACHE)}
    adapters |= {f"fresh-{index}": ensure_tiny_lora("tiny-sd", 10 + index, TINY_CACHE) for index in range(fresh)}
    entries = "".join(f"      {name}: {{source: {path}}}\n" for name, path in adapters.items())
    path = folder / "loras.yaml"
    path.write_text(f"models:\n  - id: tiny-sd\n    max_loaded_adapters: {len(adapters)}\n    adapters:\n{entries}")
    return path


def body(loras: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "size": f"{SIDE}x{SIDE}", "num_inference_steps": STEPS, "seed": seed, "loras": loras}


def batch_totals(server: LiveServer) -> tuple[float, float]:
    """(images, pipeline calls) made so far, from the server's /metrics."""
    totals = {"_sum": 0.0, "_count": 0.0}
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        for suffix in totals:
            if line.startswith(f"diffuser_batch_size_images{suffix}"):
                totals[suffix] += float(line.split()[-1])
    return totals["_sum"], totals["_count"]


def phase(server: LiveServer, label: str, bodies: list[dict[str, Any]], clients: int,
          per_call: dict[str, list[float]] | None = None) -> Callable[[], Measurement]:
    """``per_call`` gathers the phase's (images, pipeline calls) under ``label``."""
    def run() -> Measurement:
        server_cpu, own_cpu = process_cpu_s(server.process.pid), time.process_time()
        images_before, calls_before = batch_totals(server)
        started = time.perf_counter()
        latencies, failures = asyncio.run(drive(server.base_url, bodies, clients, timeout_s=300))
        if per_call is not None:
            images_after, calls_after = batch_totals(server)
            totals = per_call.setdefault(label, [0.0, 0.0])
            totals[0] += images_after - images_before
            totals[1] += calls_after - calls_before
        return Measurement(label, SIDE, STEPS, clients=clients, batch=8, images=len(latencies),
                           wall_s=time.perf_counter() - started, latencies_s=tuple(latencies), failures=failures,
                           load_cpu_s=time.process_time() - own_cpu,
                           server_cpu_s=process_cpu_s(server.process.pid) - server_cpu)

    return run


def timed(server: LiveServer, loras: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{server.base_url}{GENERATIONS}", json=body(loras, 1), timeout=300)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def first_uses(server: LiveServer, rounds: int) -> tuple[list[float], list[float], list[Measurement]]:
    """Per round: the first request naming a fresh adapter, the next one, and direct calls."""
    direct = DirectPipeline.tiny(TINY_CACHE)
    cold, hot, calls = [], [], []
    for index in range(rounds):
        calls.append(direct.measure("tiny-sd, direct call", batch=1, side=SIDE, steps=STEPS, calls=DIRECT_CALLS))
        cold.append(timed(server, [{"name": f"fresh-{index}"}]))
        hot.append(timed(server, [{"name": f"fresh-{index}"}]))
    return cold, hot, calls


def markdown(phases: dict[str, Measurement], per_call: dict[str, list[float]], cold: list[float], hot: list[float],
             call_ms: float, targets: list[Target], measured: dict[str, float], notes: list[str]) -> str:
    lines = [
        "# Benchmark: LoRA adapters on this machine",
        "",
        "Written by `make bench` (`bench/loras.py`). Latency is per HTTP request (b64 PNG included) or per",
        "direct pipeline call; first uses are medians over the rounds.",
        "",
        f"## Alternating adapter sets ({SIDE}², {STEPS} steps)",
        "",
        *tables.measurements(list(phases.values())),
        "",
        "| scenario | clients | images per pipeline call (mean) |",
        "|---|---|---|",
        *[f"| {m.label} | {m.clients} | {per_call[m.label][0] / per_call[m.label][1]:.2f} |"
          for m in phases.values()],
        "",
        f"## First use of an adapter ({SIDE}², {STEPS} steps)",
        "",
        "| one pipeline call, direct (p50 ms) | first request naming the adapter (loads it) | the next request |",
        "|---|---|---|",
        (f"| {call_ms:.1f} | {np.median(cold) * 1000 / call_ms:.2f} calls ({np.median(cold) * 1000:.0f} ms) | "
         f"{np.median(hot) * 1000 / call_ms:.2f} calls ({np.median(hot) * 1000:.0f} ms) |"),
        "",
        *tables.ratios_and_conditions(targets, measured, notes),
    ]
    return "\n".join(lines) + "\n"


def plot(phases: dict[str, Measurement], cold: list[float], hot: list[float], call_ms: float, path: Path) -> None:
    figure, (throughput, first) = plt.subplots(1, 2, figsize=(10, 4))
    bars = throughput.bar([f"{name}\n({m.clients} clients)" for name, m in phases.items()],
                          [m.images_per_s for m in phases.values()], color=["tab:blue", "tab:orange"] * 2)
    throughput.bar_label(bars, fmt="%.1f")
    throughput.set_ylabel("images/s")
    throughput.tick_params(axis="x", labelsize=7)
    throughput.set_title(f"{SIDE}², {STEPS} steps")
    values = [1.0, np.median(cold) * 1000 / call_ms, np.median(hot) * 1000 / call_ms]
    bars = first.bar(["one call (direct)", "first use (load)", "next request"], values,
                     color=["tab:gray", "tab:red", "tab:green"])
    first.bar_label(bars, fmt="%.2f")
    first.set_ylabel("in pipeline calls")
    first.set_title("first use of an adapter")
    for axis in (throughput, first):
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds of the two phases")
    parser.add_argument("--requests", type=int, default=6 * CLIENTS, help="requests per phase and round")
    parser.add_argument("--first-rounds", type=int, default=FIRST_ROUNDS, help="fresh adapters used for the first time")
    args = parser.parse_args()
    pressure_before = cpu_pressure()
    started, began = time.monotonic(), datetime.datetime.now()
    scratch = Path(tempfile.mkdtemp(prefix="diffuser-bench-loras-"))
    alternating = [body(SETS["ink" if index % 2 == 0 else "neon"], index) for index in range(args.requests)]
    one_set = [body(SETS["ink"], index) for index in range(args.requests)]
    with served(scratch, DIFFUSER_MODELS_FILE=str(models_file(scratch, args.first_rounds))) as server:
        print("warm-up: both sets loaded ...", flush=True)
        phase(server, "warm-up", alternating[:CLIENTS], CLIENTS)()
        print(f"alternating sets vs one set: {CLIENTS} and {FEW_CLIENTS} clients ...", flush=True)
        per_call: dict[str, list[float]] = {}
        phases = interleaved({
            "two sets, alternating": phase(server, "two adapter sets, alternating", alternating, CLIENTS, per_call),
            "one set": phase(server, "the same requests, one adapter set", one_set, CLIENTS, per_call),
            "two sets, alternating, few clients": phase(
                server, "two adapter sets, alternating, few clients", alternating, FEW_CLIENTS, per_call),
            "one set, few clients": phase(
                server, "the same requests, one adapter set, few clients", one_set, FEW_CLIENTS, per_call),
        }, args.rounds)
        print("first use of an adapter ...", flush=True)
        cold, hot, calls = first_uses(server, args.first_rounds)
    call_ms = Measurement.pooled(calls).p50_ms
    ratio = phases["two sets, alternating"].images_per_s / phases["one set"].images_per_s
    targets = [Target(f"two sets alternating / one set, images/s, {CLIENTS} clients", ratio, "≥ 0.90", ratio >= 0.9)]
    measured = {
        f"two sets alternating / one set, images/s, {FEW_CLIENTS} clients (smaller batches: half the clients per set)":
            phases["two sets, alternating, few clients"].images_per_s / phases["one set, few clients"].images_per_s,
        "first use of an adapter / one pipeline call (median)": float(np.median(cold)) * 1000 / call_ms,
        "load cost of an adapter, first use - next request (ms, median)": float(np.median(cold) - np.median(hot))
        * 1000,
    }
    notes = [
        (f"{began:%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores shared with other work; "
         f"before: {pressure_before}; after: {cpu_pressure()}; whole run {time.monotonic() - started:.0f} s"),
        (f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, OMP_WAIT_POLICY="
         f"{os.environ['OMP_WAIT_POLICY']}), diffusers {diffusers.__version__}; {args.rounds} interleaved rounds "
         f"of {args.requests} requests per phase, {args.first_rounds} first uses"),
        ("The adapters are rank-4 random LoRAs on every attention projection of tiny-sd's UNet (peft, saved "
         "with `save_lora_weights`, loaded with `load_lora_weights`); on a real checkpoint a load reads "
         "megabytes to hundreds of megabytes, so its first use costs more than here."),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(phases, per_call, cold, hot, call_ms, targets, measured, notes)
    (args.out / "loras.md").write_text(text)
    plot(phases, cold, hot, call_ms, args.out / "loras.png")
    print(text)


if __name__ == "__main__":
    main()
