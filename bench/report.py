"""Turns the measurements into bench/results/latest.md and the throughput plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

from bench import tables
from bench.measure import Measurement, Target


@dataclass(frozen=True)
class Results:
    phases: list[Measurement]
    sweep_on: list[Measurement]
    sweep_off: list[Measurement]
    targets: list[Target]
    notes: list[str]


def markdown(results: Results) -> str:
    lines = [
        "# Benchmark: tiny-sd on this machine",
        "",
        "Written by `make bench` (`bench/run.py`). Latency is per call (direct) or per HTTP request",
        "(served, b64 PNG response included); CPU columns are CPU time used during the phase.",
        "",
    ]
    lines += tables.measurements(results.phases)
    lines += ["", "## Ratios", ""] + tables.targets(results.targets)
    lines += [
        "",
        "## Clients sweep (64², 4 steps)",
        "",
        "| clients | batching on: images/s | p95 ms | batching off: images/s | p95 ms |",
        "|---|---|---|---|---|",
    ]
    for on, off in zip(results.sweep_on, results.sweep_off, strict=True):
        lines.append(
            f"| {on.clients} | {on.images_per_s:.1f} | {on.p95_ms:.1f} | {off.images_per_s:.1f} | {off.p95_ms:.1f} |"
        )
    lines += ["", "## Conditions", ""] + [f"- {note}" for note in results.notes]
    return "\n".join(lines) + "\n"


def plot(results: Results, path: Path) -> None:
    figure, (throughput, p95) = plt.subplots(1, 2, figsize=(10, 4))
    for sweep, label in ((results.sweep_on, "batching on"), (results.sweep_off, "batching off")):
        clients = [m.clients for m in sweep]
        throughput.plot(clients, [m.images_per_s for m in sweep], marker="o", label=label)
        p95.plot(clients, [m.p95_ms for m in sweep], marker="o", label=label)
    for axis, title, unit in ((throughput, "throughput", "images/s"), (p95, "p95 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([m.clients for m in results.sweep_on], [str(m.clients) for m in results.sweep_on])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        axis.set_title(f"tiny-sd 64×64, 4 steps: {title}")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(results: Results, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest.md").write_text(markdown(results))
    plot(results, folder / "throughput.png")
