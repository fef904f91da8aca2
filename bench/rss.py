"""The resident memory of the server process, read from /proc while load runs.

RSS (``VmRSS``) is what the kernel charges the process for, so it is the figure an OOM killer
or a container limit acts on; Python's own allocator counters would miss native buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of a live process (Linux /proc); kB in the file."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"process {pid} has no VmRSS (a zombie?)")


@dataclass
class RssSamples:
    """Every sample taken while a phase ran; ``alarm`` is set once the cap was passed or the
    process has gone, either way a reason for the caller to stop its phase."""

    samples: list[int] = field(default_factory=list)
    alarm: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def peak(self) -> int:
        return max(self.samples)


@contextlib.asynccontextmanager
async def sampled(pid: int, interval_s: float, cap_bytes: int | None = None) -> AsyncIterator[RssSamples]:
    """Sample ``pid``'s RSS every ``interval_s`` while the block runs.

    ``alarm`` is set once a sample passes ``cap_bytes``, so a phase that would exhaust a shared
    machine's memory can be stopped by its caller instead of by the OOM killer.
    """
    samples = RssSamples([rss_bytes(pid)])

    async def sample() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                samples.samples.append(rss_bytes(pid))
            except (FileNotFoundError, ProcessLookupError):
                samples.alarm.set()  # the server is gone: nothing left to measure
                return
            if cap_bytes is not None and samples.samples[-1] > cap_bytes:
                samples.alarm.set()

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
