"""The gateway's edge against slow and numerous connections (issue 9.10), below the app.

`guarded_protocol(settings)` is uvicorn's h11 HTTP protocol with two additions:

- a **header timeout**: a connection must send a whole request head within
  `header_timeout_s` of opening, or of starting its next request, or it is closed. uvicorn
  closes idle keep-alive connections (`timeout_keep_alive`) but has no such timer, so a
  client sending its headers a byte at a time held a connection open for ever.
- a **per-address cap**: at most `max_connections_per_address` open connections (HTTP or
  upgraded to WebSocket) from one peer address; one more is answered `429` (when its
  request comes) and closed.
  Trusted proxies (`trusted_proxies`) are exempt: their connections carry many clients.

It counts TCP connections, before any request is parsed, so a flood of half-open requests
from one address is bounded too. WebSocket sessions stay counted after the upgrade (the
transport is the same). The protocol relies on uvicorn's `H11Protocol` internals (`cycle`,
`handle_websocket_upgrade`): `tests/hostile/test_hostile_edges.py` runs it for real.

`uvicorn_options(settings)` are the server settings that go with it, forwarded headers
believed only from `trusted_proxies`, and TLS when `tls_cert`/`tls_key` are set (`up
--https`; the protocol above sees the decrypted bytes, so the guards hold for HTTPS too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..shared.exceptions import ConfigError
from ..shared.settings import Settings

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024  # a request line and headers (a WebSocket URL carries a token: ~200 bytes)
REFUSED_LINGER_S = 1.0  # a refused connection is closed this long after its 429, so its client reads it
REFUSED_WAIT_S = 2.0  # how long a refused connection may take to send its request
PRUNE_AT = 4096  # addresses remembered before closed connections are swept out

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(entries: list[str]) -> list[Network]:
    """Trusted proxies as networks ("*": everyone); a bad entry raises ValueError."""
    if "*" in entries:
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def is_trusted(host: str, trusted: list[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in trusted)


def refusal(max_connections: int) -> bytes:
    body = json.dumps({"error": f"too many connections from this address (at most {max_connections}); retry later"})
    return (
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}"
    ).encode()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a per-address connection cap (the
    class attributes are set by `guarded_protocol`, one subclass per server)."""

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 256
    trusted: ClassVar[list[Network]] = []
    open_by_address: ClassVar[dict[str, set[asyncio.BaseTransport]]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._upgraded = False
        self._refused = False
        self._answered = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else ""
        if host and not is_trusted(host, self.trusted) and not self._count(host, transport):
            # answered 429 once the client has sent something (a client may not expect an
            # answer before its request); closed after the header timeout at the latest
            self._refused = True
            log.info("connection from %s refused: %d open already", host, self.max_connections)
            wait = min(self.header_timeout_s, REFUSED_WAIT_S)
            self._head_timer = self.loop.call_later(wait, self._head_too_slow)
            return
        self._arm()

    def _count(self, host: str, transport: asyncio.BaseTransport) -> bool:
        """Count this connection for `host`; False (not counted) if it is one too many."""
        table = type(self).open_by_address
        if len(table) >= PRUNE_AT:
            for h in list(table):
                table[h] = {t for t in table[h] if not t.is_closing()}
                if not table[h]:
                    del table[h]
        live = {t for t in table.get(host, ()) if not t.is_closing()}
        if len(live) >= self.max_connections:
            table[host] = live
            return False
        live.add(transport)
        table[host] = live
        return True

    def data_received(self, data: bytes) -> None:
        if self._refused:
            if not self._answered:
                self._answered = True
                self._disarm()
                self.transport.write(refusal(self.max_connections))
                self.loop.call_later(REFUSED_LINGER_S, self.transport.close)
            return  # what a refused client sends is not read
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._disarm()  # a whole request head arrived
        elif not self._upgraded and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # part of the next request head: it has `header_timeout_s` to complete

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._upgraded = True
        self._disarm()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._refused and (self._upgraded or not (self.cycle is None or self.cycle.response_complete)):
            return
        log.info(
            "connection from %s closed: no whole request head within %gs",
            self.client[0] if self.client else "?",
            self.header_timeout_s,
        )
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` class configured by `settings` (a connection table of its own)."""
    attrs: dict[str, Any] = {
        "header_timeout_s": settings.header_timeout_s,
        "max_connections": settings.max_connections_per_address,
        "trusted": networks(settings.trusted_proxies),
        "open_by_address": {},
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings for the edge: the guarded protocol, keep-alive and head limits, and
    forwarded headers only from configured proxies (uvicorn's default trusts loopback), and
    the certificate when the gateway serves HTTPS."""
    options: dict[str, Any] = {
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": list(settings.trusted_proxies) or [],
    }
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("PD_TLS_CERT and PD_TLS_KEY go together: set both or neither")
    if settings.tls_cert is not None and settings.tls_key is not None:
        options["ssl_certfile"] = str(settings.tls_cert.expanduser())
        options["ssl_keyfile"] = str(settings.tls_key.expanduser())
    return options
