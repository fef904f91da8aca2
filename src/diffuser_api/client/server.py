"""Where the server is and how to authenticate: ``--server``/``--api-key`` or the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "http://127.0.0.1:8000"
# DIFFUSER_API_URL names this server; OPENAI_BASE_URL lets a shell set up for the OpenAI SDK work as is.
URL_VARIABLES = ("DIFFUSER_API_URL", "OPENAI_BASE_URL")
KEY_VARIABLE = "OPENAI_API_KEY"


@dataclass(frozen=True)
class Server:
    """The API's base URL (``http://host:port/v1``) and the key to send, if any."""

    api_base: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def url(self, path: str) -> str:
        return f"{self.api_base}/{path.lstrip('/')}"

    def websocket_url(self, path: str) -> str:
        scheme, netloc, base_path, _, _ = urlsplit(self.url(path))
        return urlunsplit(({"https": "wss"}.get(scheme, "ws"), netloc, base_path, "", ""))


def resolve_server(url: str | None, api_key: str | None, environ: Mapping[str, str] = os.environ) -> Server:
    """Flags win over the environment. A URL without a path is a server root (``/v1`` is added);
    one with a path is the API base itself, as ``OPENAI_BASE_URL`` is (``http://host:8000/v1``)."""
    chosen = url or next((environ[name] for name in URL_VARIABLES if environ.get(name)), DEFAULT_URL)
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    scheme, netloc, path, _, _ = urlsplit(chosen)
    if scheme not in ("http", "https") or not netloc:
        raise ValueError(f"--server must be an http(s) URL such as {DEFAULT_URL}, not {chosen!r}")
    api_path = path.rstrip("/") or "/v1"
    return Server(urlunsplit((scheme, netloc, api_path, "", "")), api_key or environ.get(KEY_VARIABLE) or None)
