"""The HTTP calls: the models list and variations (which have no WebSocket route)."""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from diffuser_api.client.failures import ConnectionFailed, refusal_from
from diffuser_api.client.server import Server

# Connecting is quick or the address is wrong; the answer may take as long as the work does
# (the server bounds that with its own request timeout).
TIMEOUT = httpx.Timeout(None, connect=10.0)


def list_models(server: Server) -> dict[str, Any]:
    return _call(server, "GET", "models")


def create_variation(server: Server, image: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """One multipart request. Leaving (Ctrl-C) closes the connection, and the server cancels the work."""
    files = {"image": (image.name, image.read_bytes(), mimetypes.guess_type(image.name)[0] or "image/png")}
    data = {name: str(value) for name, value in fields.items()}
    return _call(server, "POST", "images/variations", files=files, data=data)


def _call(server: Server, method: str, path: str, **request: Any) -> dict[str, Any]:
    try:
        with httpx.Client(headers=server.headers, timeout=TIMEOUT) as client:
            response = client.request(method, server.url(path), **request)
    except httpx.TransportError as error:
        raise ConnectionFailed(f"could not reach the server at {server.api_base}: {describe(error)}") from None
    body = _json_of(response)
    if response.is_error:
        raise refusal_from(body, response.status_code)
    if not isinstance(body, dict):
        status = response.status_code
        raise ConnectionFailed(f"the server at {server.api_base} did not answer with JSON (HTTP {status})")
    return body


def _json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def describe(error: Exception) -> str:
    """A short reason: the exception's kind in words, without a traceback."""
    kind = {
        httpx.ConnectError: "connection refused or host not found",
        httpx.ConnectTimeout: "timed out connecting",
        httpx.RemoteProtocolError: "the server closed the connection",
        httpx.ReadError: "the connection broke",
    }
    return next((words for error_type, words in kind.items() if isinstance(error, error_type)), type(error).__name__)
