"""Group commits: writes that arrive within the linger, or while a write runs, go as one."""

from __future__ import annotations

import asyncio
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


def test_writes_arriving_within_the_linger_commit_together() -> None:
    recorder = Recorder()
    results = asyncio.run(staggered(CoalescedWrites(recorder.write_all, linger_s=0.2), range(8), 0.005))
    assert results == [item * 10 for item in range(8)]
    assert recorder.groups == [list(range(8))]


def test_without_a_linger_the_first_write_goes_alone() -> None:
    recorder = Recorder()
    results = asyncio.run(staggered(CoalescedWrites(recorder.write_all), range(8), 0.05))
    assert results == [item * 10 for item in range(8)]
    assert recorder.groups[0] == [0]
    assert sorted(item for group in recorder.groups for item in group) == list(range(8))


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
