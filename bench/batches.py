"""Batch API throughput: a 256-line tiny-sd batch (64x64, 4 steps) against the same 256 requests
sent by 16 concurrent interactive clients, on one ``diffuser-api serve`` process.

Target: the batch's images/s at least 0.9x the interactive clients' (its lines batch with each
other as the engine has room). Phases run in back-to-back rounds, in turn first, and the ratio
is the median of the rounds' ratios with a bootstrap 95 % interval (``bench.paired``). Writes
bench/results/batches.md and bench/results/batches.png.

    PYTHONPATH=src python bench/batches.py [--lines 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ are importable from the root

import matplotlib
import openai
from tests.conftest import LiveServer

from bench.load import drive
from bench.paired import PairedRatio, alternating_rounds
from diffuser_api.engine.batching import INTERACTIVE_LIVE_S

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

SIDE, STEPS, CLIENTS = 64, 4, 16
TARGET = 0.9
GENERATIONS = "/v1/images/generations"
POLL_FIRST_S, POLL_MIN_S, POLL_MAX_S = 0.25, 0.05, 1.0
RESULTS = ROOT / "bench" / "results"


def bodies(count: int) -> list[dict]:
    """Distinct prompts and seeds, the same for both phases."""
    return [{"prompt": f"a watercolor fox {i % 13}", "size": f"{SIDE}x{SIDE}", "num_inference_steps": STEPS,
             "seed": i} for i in range(count)]


def interactive_images_per_s(base_url: str, requests: list[dict]) -> float:
    started = time.perf_counter()
    latencies, failures = asyncio.run(drive(base_url, requests, CLIENTS))
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} interactive requests failed")
    return len(latencies) / wall


def next_poll_s(elapsed_s: float, done: int, total: int) -> float:
    """Seconds until the next ``retrieve``: half the time the batch's pace says is left, between
    POLL_MIN_S and POLL_MAX_S. A patient client's few polls, not ten a second: every poll costs
    the server's cores about 2 ms and the client's as much, and on this 2-core machine ten a
    second slowed the pipeline's calls by about 6 % (measured). Polls come close together only
    near the end, so the end is still seen within POLL_MIN_S."""
    if done == 0:
        return POLL_FIRST_S
    left_s = elapsed_s * (total - done) / done
    return min(POLL_MAX_S, max(POLL_MIN_S, left_s / 2))


def batch_images_per_s(client: openai.OpenAI, requests: list[dict]) -> float:
    """From the upload to the output file downloaded: what a Batch API user waits for."""
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": GENERATIONS, "body": body}) + "\n"
                    for i, body in enumerate(requests)).encode()
    started = time.perf_counter()
    source = client.files.create(file=("bench.jsonl", lines), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=GENERATIONS, completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        counts = batch.request_counts
        done = counts.completed + counts.failed if counts is not None else 0
        time.sleep(next_poll_s(time.perf_counter() - started, done, len(requests)))
        batch = client.batches.retrieve(batch.id)
    output = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
    wall = time.perf_counter() - started
    done = len(output.splitlines())
    if batch.status != "completed" or done != len(requests):
        raise RuntimeError(f"batch ended {batch.status} with {done} of {len(requests)} lines")
    return done / wall


def write_results(rows: dict[str, list[float]], lines: int) -> float:
    """Each round's ratio is taken within the round (its two phases ran back to back, under the
    same load from whatever else shares the machine); the headline is their median."""
    paired = PairedRatio.of(list(zip(rows["interactive"], rows["batch"], strict=True)))
    ratio, (low, high) = paired.median, paired.interval()
    ratios = paired.ratios
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = [
        f"# Batch API vs interactive clients ({datetime.date.today()}, {os.cpu_count()} CPUs)",
        "",
        f"tiny-sd, {lines} requests of {SIDE}x{SIDE}, {STEPS} steps, default batching; interactive: {CLIENTS} "
        "concurrent closed-loop clients; batch: one JSONL file, from upload to output downloaded, polled as "
        "a patient client does (`next_poll_s`: more often as the end nears, not ten times a second).",
        "",
        "| round | interactive images/s | batch images/s | batch / interactive |",
        "|---|---|---|---|",
        *(f"| {index} | {interactive:.2f} | {batch:.2f} | {batch / interactive:.2f}x |"
          for index, (interactive, batch) in enumerate(zip(rows["interactive"], rows["batch"], strict=True), 1)),
        "",
        f"Median batch / interactive: **{ratio:.2f}x** (95 % interval {low:.2f}x to {high:.2f}x; "
        f"target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'}). Each round ran both phases back "
        "to back, the interactive clients first in odd rounds and the batch first in even ones.",
        "",
    ]
    (RESULTS / "batches.md").write_text("\n".join(table))
    figure, axes = plt.subplots(figsize=(6, 3))
    rounds = range(1, len(ratios) + 1)
    width = 0.4
    axes.bar([r - width / 2 for r in rounds], rows["interactive"], width, label="interactive (16 clients)")
    axes.bar([r + width / 2 for r in rounds], rows["batch"], width, label="batch")
    axes.set_xticks(list(rounds), [f"round {r}" for r in rounds])
    axes.set_ylabel("images/s")
    axes.set_title(f"{lines} tiny-sd requests: batch {ratio:.2f}x interactive (median)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "batches.png", dpi=120)
    return ratio


def alone(label: str, images_per_s: Callable[[], float]) -> Callable[[], float]:
    """The phase on its own: the batch past the time the engine keeps background batches at
    half size after interactive requests stop."""
    def phase() -> float:
        time.sleep(INTERACTIVE_LIVE_S)
        rate = images_per_s()
        print(f"{label}: {rate:.2f} images/s", flush=True)
        return rate

    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    requests = bodies(args.lines)
    with tempfile.TemporaryDirectory() as scratch:
        # Server defaults (DIFFUSER_JOB_POLL_S=1): a batch's steps are woken by events (created,
        # lines stored, a line ended), not by the poll, and a faster poll is only more queries.
        server = LiveServer(Path(scratch), DIFFUSER_JOBS_URL=f"sqlite:///{scratch}/jobs.sqlite3")
        try:
            server.wait_ready()
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-bench", max_retries=0,
                                   timeout=120)
            # Both paths warmed up once (first-call costs: imports, compiled queries, caches).
            asyncio.run(drive(server.base_url, requests[:CLIENTS], CLIENTS))
            batch_images_per_s(client, requests[:CLIENTS])
            rows = alternating_rounds({
                "interactive": alone("interactive", lambda: interactive_images_per_s(server.base_url, requests)),
                "batch": alone("batch", lambda: batch_images_per_s(client, requests)),
            }, args.rounds)
        finally:
            server.stop()
    ratio = write_results(rows, args.lines)
    print(f"batch / interactive = {ratio:.2f}x; results in {RESULTS / 'batches.md'}")


if __name__ == "__main__":
    main()
