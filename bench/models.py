"""``make bench``, several models: what a cold model costs its first request, and what churn
between three models with room for two costs a busy server.

First requests: a server (``diffuser-api serve`` with a models file) serves tiny-sdxl and the
largest tiny family by bytes (tiny-sd3); each round unloads a model (admin route), times the
request that loads it from disk (cold), then one to the loaded model (hot). Both are given as
multiples of one call of the same pipeline loaded in this process (``bench/direct.py``).

Churn: 16 closed-loop clients send Zipf-distributed requests (s = 1.1) for three models with
``max_loaded_models: 2``, against the very same requests on a server of one model. The three
models are one checkpoint under three ids, so the gap is the churn alone (loads, evictions,
waits for a model to go idle), not three models' different speeds.

The warm tier (host RAM back to a GPU) exists only off the CPU: ``bench/gpu_models.py``.
Writes bench/results/models.md and bench/results/models.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ are importable from the root
# One OpenMP regime for every process compared here (this one's direct calls and the servers,
# which inherit the environment): libgomp's default spin-waiting is fast on idle cores but
# collapses when other work takes them (a one-model server fell from 42 to 2.5 images/s as the
# machine's load rose from 3.4 to 4.3), and a server that has run torch on several threads
# stops spinning by itself. Passive waiting everywhere compares the serving, not the regimes.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

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

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

FIRST_MODELS = ("tiny-sdxl", "tiny-sd3")  # tiny-sd3: the largest tiny family (1.4 MB of weights)
FIRST_SIDE, FIRST_STEPS = 128, 8
CHURN_MODELS = ("sd-a", "sd-b", "sd-c")  # by popularity: Zipf rank 1, 2, 3
CHURN_SIDE, CHURN_STEPS = 64, 4
CLIENTS = 16
ZIPF_S = 1.1
ROUNDS = 3
FIRST_ROUNDS = 5  # single requests on a shared machine: more rounds for a steady median
DIRECT_CALLS = 4


def first_models_file(folder: Path) -> Path:
    entries = "".join(f"  - id: {model}\n" for model in FIRST_MODELS)
    path = folder / "first.yaml"
    path.write_text(f"default: {FIRST_MODELS[0]}\nmodels:\n{entries}")
    return path


def churn_models_file(folder: Path) -> Path:
    entries = "".join(f"  - id: {model}\n    source: tiny-sd\n" for model in CHURN_MODELS)
    path = folder / "churn.yaml"
    path.write_text(f"default: {CHURN_MODELS[0]}\nmax_loaded_models: 2\nmodels:\n{entries}")
    return path


def body(model: str, side: int, steps: int, seed: int = 1) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "size": f"{side}x{side}", "num_inference_steps": steps, "seed": seed}


def model_details(server: LiveServer, model: str) -> dict[str, Any]:
    return httpx.get(f"{server.base_url}/v1/models/{model}", timeout=30).json()


def timed_request(server: LiveServer, model: str) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{server.base_url}{GENERATIONS}", json=body(model, FIRST_SIDE, FIRST_STEPS), timeout=300)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def compute_s(server: LiveServer, model: str) -> float:
    """The server's total pipeline-call seconds for the model so far (its own clock)."""
    prefix = f'diffuser_compute_seconds_sum{{model="{model}"}} '
    lines = httpx.get(f"{server.base_url}/metrics", timeout=30).text.splitlines()
    return next((float(line[len(prefix):]) for line in lines if line.startswith(prefix)), 0.0)


def unload(server: LiveServer, model: str) -> None:
    httpx.post(f"{server.base_url}/v1/models/{model}/unload", timeout=30).raise_for_status()
    while model_details(server, model)["status"] != "unloaded":
        time.sleep(0.05)


@dataclass
class FirstRequests:
    """One model's first requests, cold and hot, with the direct calls they are compared to."""

    model: str
    cold_s: list[float]
    hot_s: list[float]
    load_s: list[float]  # the server's own load_seconds of each cold load (load + warm-up)
    server_call_s: list[float]  # the server's own pipeline call of each hot request
    direct: list[Measurement]

    @property
    def call_ms(self) -> float:
        return Measurement.pooled(self.direct).p50_ms

    def ratio(self, latencies_s: Sequence[float]) -> float:
        return float(np.median(latencies_s)) * 1000 / self.call_ms


def measure_first_requests(server: LiveServer, model: str, rounds: int) -> FirstRequests:
    direct = DirectPipeline.tiny(TINY_CACHE, model)
    found = FirstRequests(model, [], [], [], [], [])
    timed_request(server, model)  # the request size's first allocations, outside the rounds
    for _ in range(rounds):
        found.direct.append(direct.measure(f"{model}, direct call", batch=1, side=FIRST_SIDE, steps=FIRST_STEPS,
                                           calls=DIRECT_CALLS))
        unload(server, model)
        found.cold_s.append(timed_request(server, model))
        found.load_s.append(model_details(server, model)["load_seconds"])
        before = compute_s(server, model)
        found.hot_s.append(timed_request(server, model))
        found.server_call_s.append(compute_s(server, model) - before)
    return found


def zipf_requests(count: int, models: Sequence[str], s: float, seed: int = 0) -> list[str]:
    """``count`` model names, the k-th most popular drawn with probability ∝ 1 / k^s."""
    weights = np.array([1 / rank**s for rank in range(1, len(models) + 1)])
    picks = np.random.default_rng(seed).choice(len(models), size=count, p=weights / weights.sum())
    return [models[index] for index in picks]


def evictions(server: LiveServer, models: Sequence[str]) -> int:
    return sum(sum(model_details(server, model)["evictions"].values()) for model in models)


@dataclass
class Churn:
    """Evictions counted over a phase's runs."""

    evictions: int = 0


def churn_phase(server: LiveServer, label: str, names: Sequence[str], counted: Sequence[str],
                into: Churn) -> Callable[[], Measurement]:
    """Send the requests for ``names`` (one per request) and count the evictions they caused."""
    bodies = [body(name, CHURN_SIDE, CHURN_STEPS, seed) for seed, name in enumerate(names)]

    def phase() -> Measurement:
        before, server_cpu, own_cpu = evictions(server, counted), process_cpu_s(server.process.pid), time.process_time()
        started = time.perf_counter()
        latencies, failures = asyncio.run(drive(server.base_url, bodies, CLIENTS, timeout_s=300))
        wall = time.perf_counter() - started
        into.evictions += evictions(server, counted) - before
        return Measurement(label, CHURN_SIDE, CHURN_STEPS, clients=CLIENTS, batch=8, images=len(latencies),
                           wall_s=wall, latencies_s=tuple(latencies), failures=failures,
                           load_cpu_s=time.process_time() - own_cpu,
                           server_cpu_s=process_cpu_s(server.process.pid) - server_cpu)

    return phase


def markdown(first: list[FirstRequests], churn: dict[str, Measurement], evicted: int, requests: list[str],
             rounds: int, targets: list[Target], measured: dict[str, float], notes: list[str]) -> str:
    lines = [
        "# Benchmark: several models on this machine",
        "",
        "Written by `make bench` (`bench/models.py`). Latency is per HTTP request (b64 PNG included) or per",
        "direct pipeline call; first requests are medians over the rounds.",
        "",
        f"## First request to a model ({FIRST_SIDE}², {FIRST_STEPS} steps)",
        "",
        "| model | one pipeline call, direct (p50 ms) | the same call in the server (ms) | hot: first request, "
        "model loaded | cold: first request, loaded from disk | of which the server's load + warm-up |",
        "|---|---|---|---|---|---|",
    ]
    for found in first:
        lines.append(
            f"| {found.model} | {found.call_ms:.1f} | {np.median(found.server_call_s) * 1000:.1f} | "
            f"{found.ratio(found.hot_s):.2f} calls "
            f"({np.median(found.hot_s) * 1000:.0f} ms) | {found.ratio(found.cold_s):.1f} calls "
            f"({np.median(found.cold_s) * 1000:.0f} ms) | {np.median(found.load_s) * 1000:.0f} ms |"
        )
    shares = {model: requests.count(model) / len(requests) for model in CHURN_MODELS}
    lines += [
        "",
        f"## Churn: {CLIENTS} clients, three models with room for two ({CHURN_SIDE}², {CHURN_STEPS} steps)",
        "",
        ("Requests per model (Zipf, s = " + f"{ZIPF_S}): "
         + ", ".join(f"{model} {share:.0%}" for model, share in shares.items())
         + f"; evictions during the measured rounds: **{evicted}** "
         f"({evicted / (len(requests) * rounds) * 100:.1f} per 100 requests)."),
        "",
        *tables.measurements(list(churn.values())),
        "",
        *tables.ratios_and_conditions(targets, measured, notes),
    ]
    return "\n".join(lines) + "\n"


def plot(first: list[FirstRequests], churn: dict[str, Measurement], evicted: int, path: Path) -> None:
    figure, (latency, throughput, p95) = plt.subplots(1, 3, figsize=(13, 4))
    positions = np.arange(len(first))
    for offset, (label, pick) in enumerate((("hot", "hot_s"), ("cold (from disk)", "cold_s"))):
        values = [found.ratio(getattr(found, pick)) for found in first]
        bars = latency.bar(positions + (offset - 0.5) * 0.38, values, 0.38, label=label)
        latency.bar_label(bars, fmt="%.1f")
    latency.set_xticks(positions, [found.model for found in first])
    latency.set_yscale("log")
    latency.set_ylabel("first request, in pipeline calls")
    latency.set_title(f"first request, {FIRST_SIDE}², {FIRST_STEPS} steps")
    latency.legend()
    names = list(churn)
    for axis, values, unit in ((throughput, [m.images_per_s for m in churn.values()], "images/s"),
                               (p95, [m.p95_ms for m in churn.values()], "p95 ms")):
        bars = axis.bar(names, values, color=["tab:blue", "tab:orange"])
        axis.bar_label(bars, fmt="%.1f")
        axis.set_ylabel(unit)
        axis.set_title(f"{CLIENTS} clients, {CHURN_SIDE}²: {unit} ({evicted} evictions)")
    for axis in (latency, throughput, p95):
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds of the churn phases")
    parser.add_argument("--first-rounds", type=int, default=FIRST_ROUNDS, help="rounds of cold and hot requests")
    parser.add_argument("--requests", type=int, default=12 * CLIENTS, help="churn requests per round")
    args = parser.parse_args()
    pressure_before = cpu_pressure()
    started, began = time.monotonic(), datetime.datetime.now()
    scratch = Path(tempfile.mkdtemp(prefix="diffuser-bench-models-"))
    admin = {"DIFFUSER_ADMIN_OPEN": "true"}

    print("first requests: hot and cold ...", flush=True)
    with served(scratch, DIFFUSER_MODELS_FILE=str(first_models_file(scratch)), **admin) as server:
        first = [measure_first_requests(server, model, args.first_rounds) for model in FIRST_MODELS]

    print(f"churn: {CLIENTS} clients, three models, room for two ...", flush=True)
    requests = zipf_requests(args.requests, CHURN_MODELS, ZIPF_S)
    three = Churn()
    with (served(scratch, DIFFUSER_MODELS_FILE=str(churn_models_file(scratch))) as churning,
          served(scratch) as single):
        warm = CHURN_MODELS  # one request each: every model has loaded once before the rounds
        churn_phase(churning, "warm-up", list(warm), CHURN_MODELS, Churn())()
        churn_phase(single, "warm-up", ["tiny-sd"] * CLIENTS, (), Churn())()
        churn = interleaved({
            "three models": churn_phase(churning, "three models (Zipf), room for two", requests, CHURN_MODELS,
                                        three),
            "one model": churn_phase(single, "the same requests, one model", ["tiny-sd"] * len(requests), (), Churn()),
        }, args.rounds)

    throughput = churn["three models"].images_per_s / churn["one model"].images_per_s
    tail = churn["three models"].p95_ms / churn["one model"].p95_ms
    targets = [
        Target(f"{found.model}: hot first request / one pipeline call (median)", hot, "≤ 1.10", hot <= 1.10)
        for found in first
        for hot in [found.ratio(found.hot_s)]
    ]
    measured = {f"{found.model}: cold first request / one pipeline call (median)": found.ratio(found.cold_s)
                for found in first}
    measured |= {"churn / one model, images/s": throughput, "churn / one model, p95 latency": tail}
    notes = [
        (f"{began:%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores shared with other work; "
         f"before: {pressure_before}; after: {cpu_pressure()}; whole run {time.monotonic() - started:.0f} s"),
        (f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, OMP_WAIT_POLICY="
         f"{os.environ['OMP_WAIT_POLICY']} in every process), diffusers {diffusers.__version__}; "
         f"{args.first_rounds} rounds of first requests, {args.rounds} interleaved churn rounds of {args.requests} "
         "requests"),
        ("One pipeline call is timed in this process (`bench/direct.py`), interleaved with the server's "
         "rounds; the server's own time for the same call (its `diffuser_compute_seconds`) is shown beside it: "
         "on a busy shared machine the two differ by more than HTTP and PNG encoding do."),
        ("Cold: the model was unloaded by `POST /v1/models/{id}/unload`; its first request loads it from the "
         "disk cache (`from_pretrained`), runs the warm-up call, then the request. On CPU an evicted model is "
         "released (there is no warm tier: host RAM is the device's memory)."),
        ("Churn: sd-a, sd-b and sd-c are tiny-sd under three ids; each model was loaded once before the "
         "rounds. A request for a model that is not loaded waits until one of the loaded ones is idle "
         "(no request queued or running), which is what the p95 shows."),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(first, churn, three.evictions, requests, args.rounds, targets, measured, notes)
    (args.out / "models.md").write_text(text)
    plot(first, churn, three.evictions, args.out / "models.png")
    print(text)


if __name__ == "__main__":
    main()
