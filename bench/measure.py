"""What one benchmark phase measured, and the CPU time figures that explain it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measurement:
    """Latencies of every call or request in one phase, and its wall time.

    ``load_cpu_s`` and ``server_cpu_s`` are CPU seconds used by the load generator and the
    server process during the phase (None for direct calls): on a 2-core machine they show
    whose work competed with the pipeline.
    """

    label: str
    side: int
    steps: int
    clients: int
    batch: int
    images: int
    wall_s: float
    latencies_s: tuple[float, ...]
    failures: int = 0
    load_cpu_s: float | None = None
    server_cpu_s: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_s, 50)) * 1000

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.latencies_s, 95)) * 1000

    @classmethod
    def pooled(cls, parts: list[Measurement]) -> Measurement:
        """One measurement from interleaved rounds of the same phase: every latency, total wall time."""
        first = parts[0]

        def total(values: list[float | None]) -> float | None:
            return None if any(value is None for value in values) else sum(values)  # type: ignore[arg-type]

        return cls(
            first.label, first.side, first.steps, first.clients, first.batch,
            images=sum(part.images for part in parts), wall_s=sum(part.wall_s for part in parts),
            latencies_s=tuple(latency for part in parts for latency in part.latencies_s),
            failures=sum(part.failures for part in parts),
            load_cpu_s=total([part.load_cpu_s for part in parts]),
            server_cpu_s=total([part.server_cpu_s for part in parts]),
        )

    def cpu_share(self, cpu_s: float | None) -> float | None:
        """CPU seconds per wall second: 1.0 is one core busy for the whole phase."""
        return None if cpu_s is None else cpu_s / self.wall_s


def cpu_pressure() -> str:
    """How busy the machine is with other work: PSI where the kernel has it, else load average."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = pressure.readline().split()
        return f"CPU pressure {some[1]}, {some[2]}; load average {os.getloadavg()[0]:.2f}"
    except OSError:
        return f"load average {os.getloadavg()[0]:.2f}"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, threads included (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """A headline ratio and the goal it is held to."""

    name: str
    value: float
    goal: str
    met: bool
    unit: str = ""
