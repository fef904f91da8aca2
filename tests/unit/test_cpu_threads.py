"""CPU workers share the host's cores: each call's thread count is set on its own thread."""

from __future__ import annotations

import threading

import torch

from diffuser_api.models.cpu_threads import CpuThreads


def threads_inside(cores: CpuThreads, entered: threading.Event, leave: threading.Event, seen: list[int]) -> None:
    with cores.share() as share:
        seen += [share, torch.get_num_threads()]
        entered.set()
        leave.wait(10)


def test_a_lone_call_takes_every_core_and_later_ones_their_share():
    cores = CpuThreads(4)
    first, second = [], []
    first_in, second_in, leave = threading.Event(), threading.Event(), threading.Event()
    workers = [threading.Thread(target=threads_inside, args=(cores, first_in, leave, first))]
    workers[0].start()
    assert first_in.wait(10)
    workers.append(threading.Thread(target=threads_inside, args=(cores, second_in, leave, second)))
    workers[1].start()
    assert second_in.wait(10)
    leave.set()
    for worker in workers:
        worker.join()
    assert first == [4, 4] and second == [2, 2]
    with cores.share() as share:  # both left: alone again
        assert share == 4


def test_a_share_never_drops_below_one_thread_nor_changes_another_threads_count():
    before = torch.get_num_threads()
    cores = CpuThreads(1)
    first, second = [], []
    first_in, second_in, leave = threading.Event(), threading.Event(), threading.Event()
    workers = [threading.Thread(target=threads_inside, args=(cores, first_in, leave, first)),
               threading.Thread(target=threads_inside, args=(cores, second_in, leave, second))]
    workers[0].start()
    assert first_in.wait(10)
    workers[1].start()
    assert second_in.wait(10)
    leave.set()
    for worker in workers:
        worker.join()
    assert first == [1, 1] and second == [1, 1]
    assert torch.get_num_threads() == before
