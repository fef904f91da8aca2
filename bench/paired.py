"""Ratios of back-to-back measurements, summarised by their median and a bootstrap interval.

On two cores shared with other machines' work, the speed of this machine drifts by 10-20 %
over minutes. Two phases measured a minute apart compare two different machines; the same
phases cut into many short rounds, each run right after the other, see the same machine in
each round. Each round gives one ratio; their median is the figure and the spread of
resampled medians its 95 % interval.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PairedRatio:
    """``ratios``: one candidate / baseline ratio per round."""

    ratios: tuple[float, ...]

    @classmethod
    def of(cls, pairs: list[tuple[float, float]] | tuple[tuple[float, float], ...]) -> PairedRatio:
        """From (baseline, candidate) pairs."""
        return cls(tuple(candidate / baseline for baseline, candidate in pairs))

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def interval(self, resamples: int = 2000) -> tuple[float, float]:
        """Bootstrap 95 % interval of the median (fixed seed: the same rounds give the same interval)."""
        draw = random.Random(0)
        medians = sorted(statistics.median(draw.choices(self.ratios, k=len(self.ratios))) for _ in range(resamples))
        return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]

    def summary(self) -> str:
        low, high = self.interval()
        return f"median of {len(self.ratios)} back-to-back rounds, 95 % interval {low:.2f} to {high:.2f}"


def alternating_rounds(phases: dict[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Run every phase once per round, back to back; the order reverses every other round, so
    no phase always runs first (on a warmer or colder machine). Each phase's results, in round order."""
    parts: dict[str, list[T]] = {name: [] for name in phases}
    for index in range(rounds):
        for name in (list(phases) if index % 2 == 0 else list(reversed(phases))):
            parts[name].append(phases[name]())
    return parts
