"""uvicorn, with the models told the moment shutdown begins.

uvicorn's graceful shutdown first waits (up to ``timeout_graceful_shutdown``) for open
connections to close, and only then runs the app's lifespan shutdown. A request still queued
behind the running batch would wait out the whole grace for its 503. This server drains the
models as soon as shutdown starts: queued requests answer 503 with ``Retry-After`` at once,
running ones get the grace to finish, and past it they answer 503 too, before uvicorn's own
deadline cuts their connections; the whole shutdown stays within the grace.
"""

from __future__ import annotations

import socket

import uvicorn

from diffuser_api.models.registry import ModelRegistry

# Running requests stop this much before the grace ends, so their 503 leaves before uvicorn
# cancels what is left.
ANSWER_MARGIN_S = 0.5
# uvicorn's own deadline for open connections comes this much before the grace ends, so the
# app's shutdown (stopping workers, flushing traces) and the process exit fit inside the grace.
EXIT_MARGIN_S = 0.25


def connections_deadline_s(grace_s: float) -> float:
    """``timeout_graceful_shutdown`` for uvicorn: its backstop, inside the grace."""
    return max(0.0, grace_s - min(EXIT_MARGIN_S, grace_s / 4))


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, grace_s: float) -> None:
        """``config.timeout_graceful_shutdown`` should be ``connections_deadline_s(grace_s)``."""
        super().__init__(config)
        self._registry = registry
        self._grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._registry.drain(max(0.0, self._grace_s - min(ANSWER_MARGIN_S, self._grace_s / 2)))
        await super().shutdown(sockets)
