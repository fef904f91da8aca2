"""Who the client is behind proxies: one rule, ``settings.trusted_proxies``, for the whole app.

``X-Forwarded-For/-Proto/-Host`` are plain request headers anyone can send, so they count only
when the peer (the TCP connection's other end) is a trusted proxy. A trusted proxy *appends*
the address it saw to ``X-Forwarded-For``; whatever is left of that was written by someone
further out, possibly the client itself. So the client is the right-most address, reading the
peer as the last hop, that is not a trusted proxy: a caller cannot pick its own identity (and
so its own rate-limit budget) by sending fake addresses, since those land left of the one the
proxy added.

uvicorn does not apply its own proxy-header handling (``cli.py`` starts it with
``proxy_headers=False``): it would rewrite the peer address before the app sees it, trusting
127.0.0.1 by default, and this rule could no longer tell a proxy from a client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection

from diffuser_api.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN_CLIENT = "unknown"
FORWARDED_SCHEMES = frozenset({"http", "https"})


class ProxyRule:
    """Built once from settings and kept on ``app.state.proxies``."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._networks = tuple(_network(entry) for entry in trusted)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProxyRule:
        return cls(settings.trusted_proxies)

    def trusts(self, address: str | None) -> bool:
        parsed = parse_address(address)
        return parsed is not None and any(parsed in network for network in self._networks)

    def client_address(self, connection: HTTPConnection) -> str:
        """The right-most hop that is not a trusted proxy; the peer itself when it is not one."""
        peer = connection.client.host if connection.client else UNKNOWN_CLIENT
        if not self.trusts(peer):
            return _canonical(peer)
        hops = [*header_values(connection.headers, "x-forwarded-for"), peer]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return _canonical(hop)
        return _canonical(hops[0])  # only proxies all the way: the farthest one is the client

    def forwarded_scheme(self, connection: HTTPConnection) -> str | None:
        """``X-Forwarded-Proto`` as the nearest proxy set it; None unless the peer is trusted."""
        scheme = self._forwarded(connection, "x-forwarded-proto")
        return scheme.lower() if scheme and scheme.lower() in FORWARDED_SCHEMES else None

    def forwarded_host(self, connection: HTTPConnection) -> str | None:
        """``X-Forwarded-Host`` as the nearest proxy set it; None unless the peer is trusted."""
        host = self._forwarded(connection, "x-forwarded-host")
        return host if host and _plausible_host(host) else None

    def _forwarded(self, connection: HTTPConnection, name: str) -> str | None:
        if connection.client is None or not self.trusts(connection.client.host):
            return None
        values = header_values(connection.headers, name)
        # The right-most value is the one the peer (a trusted proxy) wrote or passed on last.
        return values[-1] if values else None


def proxies_of(connection: HTTPConnection) -> ProxyRule:
    """The app's rule, for code that has only the request."""
    rule: ProxyRule = connection.app.state.proxies
    return rule


def header_values(headers: Headers, name: str) -> list[str]:
    """All comma-separated values of every copy of a header, in order."""
    return [value.strip() for line in headers.getlist(name) for value in line.split(",") if value.strip()]


def parse_address(text: str | None) -> IPAddress | None:
    """An IP address, also written as ``1.2.3.4:80`` or ``[::1]:80`` (some proxies add the port);
    IPv4-mapped IPv6 as its IPv4 address, so ``10.0.0.0/8`` covers ``::ffff:10.0.0.1``."""
    if not text:
        return None
    text = text.strip()
    candidates = [text]
    if text.startswith("["):
        candidates.append(text[1:].partition("]")[0])
    elif text.count(":") == 1:
        candidates.append(text.partition(":")[0])
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return mapped or address
    return None


def _canonical(hop: str) -> str:
    """One spelling per address, so ``::ffff:1.2.3.4`` and ``1.2.3.4`` share a budget; a hop that
    is no address (``unknown``, a test client's name) is kept as written, cut short."""
    parsed = parse_address(hop)
    return str(parsed) if parsed is not None else hop.strip()[:64] or UNKNOWN_CLIENT


def _network(entry: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"trusted_proxies: {entry!r} is not an IP address or network (such as 10.0.0.1 or 10.0.0.0/8)"
        ) from None


def _plausible_host(host: str) -> bool:
    """A host[:port] a URL can carry; anything else (spaces, slashes, @) is ignored."""
    return all(char.isalnum() or char in ".-:[]" for char in host) and len(host) <= 255
