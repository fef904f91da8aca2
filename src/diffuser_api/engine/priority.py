"""Priority classes of queued work, and the ageing that keeps the lower ones from starving.

Interactive requests (synchronous calls, streams, WebSocket) have a client waiting on an open
connection; async jobs have a client that polls; batch lines have one that checks back
tomorrow. So the queue serves them in that order, but a request that has waited long enough
moves up: its class improves by one for every ``ageing_s`` seconds it has waited, down to
``INTERACTIVE``. Within one effective class the oldest request goes first, so an aged job
goes before interactive requests that arrived after it: no class waits forever, however busy
the ones above it are (a batch line waits at most ``2 x ageing_s`` before it competes as an
interactive request).
"""

from __future__ import annotations

import math
from enum import IntEnum


class Priority(IntEnum):
    """Lower goes first."""

    INTERACTIVE = 0
    JOB = 1
    BATCH = 2


def effective_class(priority: Priority, waited_s: float, ageing_s: float) -> int:
    """``priority`` improved by one per whole ``ageing_s`` waited, never better than INTERACTIVE."""
    steps = math.floor(max(0.0, waited_s) / ageing_s)
    return max(Priority.INTERACTIVE, priority - steps)
