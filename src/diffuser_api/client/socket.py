"""The WebSocket session (``/v1/images/ws``): one generation or edit, with live progress.

The WebSocket rather than SSE because it reports queue position, model loading and every step;
OpenAI's SSE events carry previews only. Closing the socket is how the server learns to cancel.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from diffuser_api.client.failures import ConnectionFailed, refusal_from
from diffuser_api.client.server import Server

MessageHandler = Callable[[dict[str, Any]], None]


def run_session(server: Server, body: Mapping[str, Any], on_message: MessageHandler) -> None:
    """Send ``body`` and pass every message up to ``done`` to ``on_message``.

    Ctrl-C cancels the session's task (``asyncio.run`` does that on SIGINT), which closes the
    socket before ``KeyboardInterrupt`` reaches the caller: the server stops the work.
    """
    asyncio.run(_session(server, body, on_message))


async def _session(server: Server, body: Mapping[str, Any], on_message: MessageHandler) -> None:
    url = server.websocket_url("images/ws")
    try:
        # max_size=None: a finished image arrives whole in one message, often over the 1 MiB default.
        socket = await connect(url, additional_headers=server.headers, max_size=None, open_timeout=10,
                               close_timeout=2)
    except InvalidStatus as error:  # refused in the handshake (key, origin, rate limit): an HTTP answer
        raise refusal_from(_json_of(error.response.body), error.response.status_code) from None
    except InvalidURI:
        raise ConnectionFailed(f"{url} is not a WebSocket URL") from None
    except (OSError, TimeoutError, InvalidHandshake) as error:
        reason = "timed out" if isinstance(error, TimeoutError) else "connection refused or host not found"
        raise ConnectionFailed(f"could not reach the server at {server.api_base}: {reason}") from None
    async with socket:
        try:
            await socket.send(json.dumps(body))
            async for raw in socket:
                message = json.loads(raw)
                if message.get("type") == "error":
                    raise refusal_from(message, None)
                if message.get("type") == "done":
                    return
                on_message(message)
        except ConnectionClosed:
            pass
    raise ConnectionFailed("the server closed the connection before the images were done")


def _json_of(body: bytes | None) -> Any:
    try:
        return json.loads(body or b"")
    except ValueError:
        return None
