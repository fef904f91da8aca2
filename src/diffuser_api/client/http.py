"""The HTTP calls: the models list, variations (which have no WebSocket route), async jobs,
and the Files and Batch APIs."""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import httpx

from diffuser_api.client.failures import ConnectionFailed, refusal_from
from diffuser_api.client.server import Server

# Connecting is quick or the address is wrong; the answer may take as long as the work does
# (the server bounds that with its own request timeout).
TIMEOUT = httpx.Timeout(None, connect=10.0)
ASYNC = {"Prefer": "respond-async"}


def list_models(server: Server) -> dict[str, Any]:
    return _call(server, "GET", "models")


def create_variation(
    server: Server, image: Path, fields: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One multipart request. Leaving (Ctrl-C) closes the connection, and the server cancels the work."""
    files = {"image": (image.name, image.read_bytes(), mimetypes.guess_type(image.name)[0] or "image/png")}
    return _call(server, "POST", "images/variations", files=files, data=form_fields(fields), headers=headers)


def form_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Multipart carries text only: lists (``loras``) go as their JSON, as the server reads them."""
    return {name: json.dumps(value) if isinstance(value, list | dict) else str(value)
            for name, value in fields.items()}


def submit_json_job(server: Server, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """``Prefer: respond-async``: the server checks the request, stores it and answers 202 with the job."""
    return _call(server, "POST", f"images/{endpoint}", json=dict(body), headers=ASYNC)


def submit_variation_job(server: Server, image: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    return create_variation(server, image, fields, headers=ASYNC)


def list_jobs(server: Server, params: Mapping[str, Any]) -> dict[str, Any]:
    return _call(server, "GET", "images/jobs", params={name: value for name, value in params.items()
                                                        if value is not None})


def get_job(server: Server, job_id: str) -> dict[str, Any]:
    return _call(server, "GET", job_path(job_id))


def cancel_job(server: Server, job_id: str) -> dict[str, Any]:
    return _call(server, "POST", f"{job_path(job_id)}/cancel")


def job_path(job_id: str) -> str:
    """Quoted: an id is the user's text, and a mistyped one must reach the server as one path segment."""
    return f"images/jobs/{quote(job_id, safe='')}"


def upload_batch_file(server: Server, path: Path) -> dict[str, Any]:
    """Streamed from the open file: a batch file may be larger than is worth holding in memory."""
    with path.open("rb") as source:
        return _call(server, "POST", "files", files={"file": (path.name, source, "application/jsonl")},
                     data={"purpose": "batch"})


def create_batch(server: Server, input_file_id: str, endpoint: str) -> dict[str, Any]:
    return _call(server, "POST", "batches", json={"input_file_id": input_file_id, "endpoint": endpoint,
                                                  "completion_window": "24h"})


def get_batch(server: Server, batch_id: str) -> dict[str, Any]:
    return _call(server, "GET", f"batches/{quote(batch_id, safe='')}")


def cancel_batch(server: Server, batch_id: str) -> dict[str, Any]:
    return _call(server, "POST", f"batches/{quote(batch_id, safe='')}/cancel")


def file_content(server: Server, file_id: str) -> bytes:
    return download(server, server.url(f"files/{quote(file_id, safe='')}/content"))


def image_b64(server: Server, item: Mapping[str, Any]) -> str:
    """An image of a response as base64, downloaded when the request asked for a URL."""
    if item.get("b64_json"):
        return str(item["b64_json"])
    return base64.b64encode(download(server, urljoin(f"{server.api_base}/", str(item["url"])))).decode()


def download(server: Server, url: str) -> bytes:
    """An image the server returned as a URL (a job asked for ``response_format=url``)."""
    try:
        with httpx.Client(headers=server.headers, timeout=TIMEOUT) as client:
            response = client.get(url)
    except httpx.TransportError as error:
        raise ConnectionFailed(f"could not download {url}: {describe(error)}") from None
    if response.is_error:
        raise refusal_from(_json_of(response), response.status_code)
    return response.content


def _call(server: Server, method: str, path: str, headers: Mapping[str, str] | None = None,
          **request: Any) -> dict[str, Any]:
    try:
        with httpx.Client(headers=server.headers, timeout=TIMEOUT) as client:
            response = client.request(method, server.url(path), headers=headers, **request)
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
