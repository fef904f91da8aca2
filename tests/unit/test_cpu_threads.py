"""CPU workers share the host's cores: each call's thread count is set on its own thread."""

from __future__ import annotations

import threading

import torch

from diffuser_api.models.cpu_threads import CpuThreads


def two_overlapping_shares(cores: CpuThreads) -> tuple[list[int], list[int]]:
    """Two threads inside ``cores.share()`` at once, the first entering first: what each was
    given and what torch then said its thread count was."""
    seen: tuple[list[int], list[int]] = ([], [])
    entered = (threading.Event(), threading.Event())
    leave = threading.Event()

    def inside(index: int) -> None:
        with cores.share() as share:
            seen[index].extend([share, torch.get_num_threads()])
            entered[index].set()
            leave.wait(10)

    workers = [threading.Thread(target=inside, args=(index,)) for index in (0, 1)]
    for worker, has_entered in zip(workers, entered, strict=True):
        worker.start()
        assert has_entered.wait(10)
    leave.set()
    for worker in workers:
        worker.join()
    return seen


def test_a_lone_call_takes_every_core_and_later_ones_their_share():
    cores = CpuThreads(4)
    assert two_overlapping_shares(cores) == ([4, 4], [2, 2])
    with cores.share() as share:  # both left: alone again
        assert share == 4


def test_a_share_never_drops_below_one_thread_nor_changes_another_threads_count():
    before = torch.get_num_threads()
    assert two_overlapping_shares(CpuThreads(1)) == ([1, 1], [1, 1])
    assert torch.get_num_threads() == before
