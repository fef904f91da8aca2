"""Browser safety: the Host allow-list (DNS rebinding) and the WebSocket Origin rule.

A page on evil.example can point its own name at 127.0.0.1 after loading, then call a local
server as its "same origin": only the Host header (evil.example) gives it away, so a server
on loopback answers only to loopback names. And browsers let any page open a WebSocket to
any server (CORS does not apply), telling the server only its Origin, so the server checks it.

A middleware rather than a check in each route, so every route, WebSockets added later too,
is covered without opting in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from diffuser_api.api.auth import refuse
from diffuser_api.config import Settings
from diffuser_api.errors import DiffuserError, Forbidden, InvalidRequest

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Probes and scrapers address a pod by an IP no allow-list can name ahead; these paths answer
# whatever the Host, and say nothing a rebinding page could use (/metrics keeps its key).
PROBE_PATHS = frozenset({"/health", "/metrics"})
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

BAD_HOST = (
    "The Host header names no host this server answers to; the allowed_hosts setting "
    "(DIFFUSER_ALLOWED_HOSTS) lists the ones it does."
)
BAD_ORIGIN = (
    "WebSockets are accepted from pages of this server's own origin or of an origin in the "
    "cors_allow_origins setting (DIFFUSER_CORS_ALLOW_ORIGINS) only."
)


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` of a Host header or allow-list entry, lower case; None if malformed.

    IPv6 names keep their brackets (``[::1]``), as the Host header writes them.
    """
    text = value.strip().lower()
    if text.startswith("["):
        name, bracket, rest = text.partition("]")
        name += bracket
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    elif text.count(":") > 1:  # a bare IPv6 address, as settings may write it
        name, port = f"[{text}]", ""
    else:
        name, _, port = text.partition(":")
    name = name.rstrip(".")  # "localhost." is localhost
    if not name or (port and not port.isdigit()):
        return None
    return name, int(port) if port else None


def is_loopback(address: str) -> bool:
    address = address.strip("[]")
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class HostAllowList:
    """Entries are ``name`` (any port), ``name:port``, ``*.domain`` (its subdomains) or ``*``.

    ``None`` allows every host.
    """

    def __init__(self, entries: Sequence[str] | None) -> None:
        self._any = entries is None or "*" in entries
        self._entries = [] if entries is None or self._any else [self._parse(entry) for entry in entries]

    @staticmethod
    def _parse(entry: str) -> tuple[str, int | None]:
        parsed = split_host(entry)
        if parsed is None:  # said at start-up, not as a 400 to every request
            raise ValueError(f"allowed_hosts entry '{entry}' is not name, name:port, *.domain or *")
        return parsed

    @classmethod
    def from_settings(cls, settings: Settings) -> HostAllowList:
        """Unset: loopback names when bound to loopback; any host otherwise (probes use the pod IP)."""
        if settings.allowed_hosts is not None:
            return cls(settings.allowed_hosts)
        return cls(LOOPBACK_NAMES if is_loopback(settings.host) else None)

    def allows(self, header: str) -> bool:
        if self._any:
            return True
        host = split_host(header)
        if host is None:
            return False
        name, port = host
        return any(
            (name == allowed or (allowed.startswith("*.") and name.endswith(allowed[1:])))
            and (allowed_port is None or allowed_port == port)
            for allowed, allowed_port in self._entries
        )


class WebSocketOrigins:
    """No Origin (not a browser), the server's own origin, or a CORS origin (``*``: any)."""

    def __init__(self, cors_origins: Sequence[str]) -> None:
        self._any = "*" in cors_origins
        self._origins = {origin.strip().lower().rstrip("/") for origin in cors_origins}

    def allows(self, origin: str | None, host: str, scheme: str) -> bool:
        if origin is None or self._any or origin.strip().lower().rstrip("/") in self._origins:
            return True
        return self._same_origin(origin, host, scheme)

    @staticmethod
    def _same_origin(origin: str, host: str, scheme: str) -> bool:
        """Compares name and port, each with its scheme's default port when it names none."""
        parts = urlsplit(origin.strip())
        theirs, ours = split_host(parts.netloc), split_host(host)
        if theirs is None or ours is None or parts.scheme not in DEFAULT_PORTS:
            return False
        their_port = theirs[1] or DEFAULT_PORTS[parts.scheme]
        our_port = ours[1] or DEFAULT_PORTS.get(scheme)
        return theirs[0] == ours[0] and their_port == our_port


class BrowserSafetyMiddleware:
    def __init__(self, app: ASGIApp, hosts: HostAllowList, origins: WebSocketOrigins) -> None:
        self.app = app
        self._hosts = hosts
        self._origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] in ("http", "websocket") else None
        if refusal is not None:
            await refuse(scope, receive, send, refusal)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> DiffuserError | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if scope["path"] not in PROBE_PATHS and not self._hosts.allows(host):
            return InvalidRequest(BAD_HOST, code="invalid_host")
        origin = headers.get("origin")
        if scope["type"] == "websocket" and not self._origins.allows(origin, host, scope.get("scheme", "ws")):
            return Forbidden(BAD_ORIGIN, code="origin_not_allowed")
        return None
