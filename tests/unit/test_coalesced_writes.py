"""Group commits: writes on their way when a group starts (within its linger), or arriving while
it is written, go as one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from diffuser_api.jobs.coalesced import CoalescedWrites


class Recorder:
    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    def write_all(self, items: Sequence[int]) -> list[int]:
        self.groups.append(list(items))
        return [item * 10 for item in items]


async def staggered(writes: CoalescedWrites[int, int], items: range, gap_s: float) -> list[int]:
    async def one(item: int) -> int:
        await asyncio.sleep(item * gap_s)
        return await writes.write(item)

    return await asyncio.gather(*(one(item) for item in items))


def test_a_group_waits_for_the_writes_on_their_way_then_commits_them_together() -> None:
    recorder = Recorder()
    arrived: list[int] = []

    async def scenario() -> list[int]:
        writes = CoalescedWrites(recorder.write_all, linger_s=5.0, settled=lambda: len(arrived) == 8)

        async def one(item: int) -> int:
            await asyncio.sleep(item * 0.005)
            arrived.append(item)
            return await writes.write(item)

        return await asyncio.gather(*(one(item) for item in range(8)))

    started = time.monotonic()
    assert asyncio.run(scenario()) == [item * 10 for item in range(8)]
    assert recorder.groups == [list(range(8))]
    assert time.monotonic() - started < 2.0, "it went as soon as the last write arrived, not at the linger's end"


def test_with_nothing_on_its_way_a_write_does_not_linger() -> None:
    recorder = Recorder()
    started = time.monotonic()
    results = asyncio.run(staggered(CoalescedWrites(recorder.write_all, linger_s=5.0), range(3), 0.2))
    assert results == [0, 10, 20]
    assert recorder.groups == [[0], [1], [2]]
    assert time.monotonic() - started < 2.0


def test_the_linger_bounds_the_wait_for_writes_that_never_come() -> None:
    recorder = Recorder()
    started = time.monotonic()
    assert asyncio.run(CoalescedWrites(recorder.write_all, linger_s=0.1, settled=lambda: False).write(1)) == 10
    assert 0.1 <= time.monotonic() - started < 2.0
    assert recorder.groups == [[1]]


def test_a_failed_group_fails_each_of_its_writers_and_the_next_group_still_runs() -> None:
    calls = []

    def write_all(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise OSError("disk full")
        return list(items)

    async def scenario() -> tuple[list[object], int]:
        writes = CoalescedWrites(write_all, linger_s=0.05)
        first = await asyncio.gather(writes.write(1), writes.write(2), return_exceptions=True)
        return first, await writes.write(3)

    first, later = asyncio.run(scenario())
    assert all(isinstance(outcome, OSError) for outcome in first)
    assert later == 3
    assert calls == [[1, 2], [3]]
