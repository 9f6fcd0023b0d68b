"""Bounds for a TCP listener: who may connect, how many at once, and a file-descriptor budget.

A LAN peer that opens connections and never talks must not use up the process's file
descriptors: every listener admits at most ``max_total`` connections and ``max_per_address``
from one address (one /64 for IPv6), refuses the rest right after accept (the socket is closed
at once), counts the refusals and logs them at most once a minute. :func:`raise_fd_limit` makes
sure the caps of all listeners fit into the process's open-file limit, so accept() itself never
fails for want of one.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .ratelimit import RateLimit

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOG_INTERVAL = 60.0  # seconds between two log lines about refused connections of one listener

#: File descriptors the process needs besides the listeners' connections: the listening sockets,
#: the state file (SQLite with WAL: database, -wal, -shm), the event loop's own, stdio, a phase
#: switch command's pipes, Python's imports and some slack.
FD_RESERVE = 64


class Refusal:
    """Why a connection was refused (metric label values)."""

    NOT_ALLOWED = "not_allowed"
    TOTAL = "total"
    PER_ADDRESS = "per_address"


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``["192.168.1.10", "10.0.0.0/8", "::1"]`` -> networks; ValueError names a bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(networks)


def host_of(peer: object) -> str:
    """The address part of a socket's peer name (IPv4-mapped IPv6 addresses as IPv4)."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    return host.removeprefix("::ffff:") if isinstance(host, str) and "." in host else str(host)


def address_in(host: str, networks: tuple[Network, ...]) -> bool:
    """True if ``host`` (a literal address) lies in one of ``networks``."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


def address_key(host: str) -> str:
    """What the per-address cap counts: an IPv4 address, or an IPv6 address's /64.

    One IPv6 host picks as many addresses from its /64 as it likes (privacy addresses), so a
    cap per IPv6 address would bound nothing.
    """
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network(f"{host.split('%')[0]}/64", strict=False))
    except ValueError:
        return host


class LimiterObserver:
    """Receives refusals (for metrics)."""

    def connection_refused(self, listener: str, reason: str) -> None:
        """A connection to ``listener`` was refused for ``reason`` (a :class:`Refusal`)."""


@dataclass
class ConnectionLimiter:
    """Admits connections to one listener within its caps; release what you admitted."""

    listener: str  # "modbus", "evse", "http": for logs and metrics
    max_total: int
    max_per_address: int
    allow: tuple[Network, ...] | None = None  # None: every address may connect
    observer: LimiterObserver | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.open = 0
        self._by_address: dict[str, int] = {}
        self._log_limit = RateLimit(1 / LOG_INTERVAL, burst=1)

    @classmethod
    def unbounded(cls, listener: str) -> ConnectionLimiter:
        """A limiter that admits everyone (a listener used on its own, e.g. in tools)."""
        return cls(listener, max_total=2**31, max_per_address=2**31)

    def admit(self, host: str) -> str | None:
        """Take a slot for a connection from ``host``; the refusal reason if there is none."""
        if self.allow is not None and not address_in(host, self.allow):
            reason = Refusal.NOT_ALLOWED
        elif self.open >= self.max_total:
            reason = Refusal.TOTAL
        elif self._by_address.get(address_key(host), 0) >= self.max_per_address:
            reason = Refusal.PER_ADDRESS
        else:
            key = address_key(host)
            self.open += 1
            self._by_address[key] = self._by_address.get(key, 0) + 1
            return None
        self._refused(host, reason)
        return reason

    def release(self, host: str) -> None:
        """Give back the slot of an admitted connection from ``host``."""
        key = address_key(host)
        self.open -= 1
        left = self._by_address[key] - 1
        if left:
            self._by_address[key] = left
        else:
            del self._by_address[key]

    def _refused(self, host: str, reason: str) -> None:
        if self.observer is not None:
            self.observer.connection_refused(self.listener, reason)
        if self._log_limit.allow(self.clock()):
            log.warning(
                "%s: refused a connection from %s (%s; %d open, at most %d, %d per address)%s",
                self.listener,
                host,
                reason.replace("_", " "),
                self.open,
                self.max_total,
                self.max_per_address,
                self._log_limit.left_out(),
            )


def raise_fd_limit(needed: int) -> int:
    """Raise the soft open-file limit towards the hard one so that ``needed`` fit.

    Returns the soft limit now in force (below ``needed`` if the hard limit is).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new
