"""The host's cores, shared among the CPU workers that are running a pipeline call.

torch's intra-op threads work in teams that meet at a barrier after every operator, and by
default every worker's team has as many threads as there are cores. Two workers on one CPU
(``DIFFUSER_DEVICE=cpu,cpu``) then run twice as many threads as cores: a preempted thread
stalls its team at the next barrier. Measured on 2 cores (tiny-sd, 64x64, 16 clients): the
two workers served 1.25x the images once each call took its share instead of all the cores.

So each call takes its share when it starts: all the cores when it runs alone (a lone request
is as fast as with one worker), ``cores // busy`` when other CPU workers are busy. torch's
thread count belongs to the calling thread (``torch.set_num_threads`` on the worker's own
thread sets its OpenMP team size), so a worker's share never changes another's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class CpuThreads:
    """One per process (the cores are the process's): every CPU runner of every model shares it."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._busy = 0
        self._lock = threading.Lock()

    @classmethod
    def of_this_process(cls) -> CpuThreads:
        """As many as torch would use (its default honours ``OMP_NUM_THREADS``, which Ray sets
        from a replica's ``num_cpus``); read on the thread that builds the server."""
        return cls(torch.get_num_threads())

    @contextlib.contextmanager
    def share(self) -> Iterator[int]:
        """Run the calling thread's next pipeline call on its share of the cores; yields it."""
        with self._lock:
            self._busy += 1
            threads = max(1, self.cores // self._busy)
        torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            with self._lock:
                self._busy -= 1
