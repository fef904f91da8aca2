"""Markdown tables of measurements and ratios, shared by every benchmark report.

No plotting imports here: the GPU script writes its report on machines without matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bench.measure import Measurement, Target


def _cpu(measurement: Measurement, cpu_s: float | None) -> str:
    share = measurement.cpu_share(cpu_s)
    return "–" if cpu_s is None or share is None else f"{cpu_s:.1f} s ({share:.2f} cores)"


def measurements(phases: Sequence[Measurement], *, cpu: bool = True) -> list[str]:
    header = "| scenario | size, steps | clients | batch ≤ | images | images/s | p50 ms | p95 ms |"
    rule = "|---|---|---|---|---|---|---|---|"
    if cpu:
        header += " load generator CPU | server CPU |"
        rule += "---|---|"
    lines = [header, rule]
    for m in phases:
        row = (f"| {m.label} | {m.side}², {m.steps} | {m.clients} | {m.batch} | {m.images} | "
               f"{m.images_per_s:.2f} | {m.p50_ms:.1f} | {m.p95_ms:.1f} |")
        if cpu:
            row += f" {_cpu(m, m.load_cpu_s)} | {_cpu(m, m.server_cpu_s)} |"
        if m.failures:
            row += f" **{m.failures} failed requests** |"
        lines.append(row)
    return lines


def targets(items: Sequence[Target]) -> list[str]:
    lines = ["| ratio | measured | target | met |", "|---|---|---|---|"]
    for target in items:
        met = "yes" if target.met else "no"
        lines.append(f"| {target.name} | {target.value:.2f}{target.unit} | {target.goal} | {met} |")
    return lines


def ratios_and_conditions(items: Sequence[Target], measured: Mapping[str, float], notes: Sequence[str]) -> list[str]:
    """A report's closing sections: the ratios with targets, those without, and the conditions."""
    return [
        "## Ratios",
        "",
        *targets(items),
        "",
        "| ratio, no target | measured |",
        "|---|---|",
        *[f"| {name} | {value:.2f} |" for name, value in measured.items()],
        "",
        "## Conditions",
        "",
        *[f"- {note}" for note in notes],
    ]
