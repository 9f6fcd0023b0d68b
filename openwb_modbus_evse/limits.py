"""Bounds for a TCP listener: who may connect, how many at once, and a file-descriptor budget.

A LAN peer that opens connections and never talks must not use up the process's file
descriptors: every listener holds at most ``max_total`` connections and ``max_per_address``
from one address (one /64 for IPv6). Nor may such a peer keep out the clients that matter, so a
full listener makes room rather than turning the newcomer away: it closes a connection that has
not got past its handshake (half-open) first, else the longest idle one of the address that holds
the most (of the newcomer's own address, when that one is at its cap). Connections marked
protected (a controller that wrote, a known station, an allowed network) are never closed for a
newcomer; only when nothing else is left is the newcomer refused (the socket closed at once).
Evictions and refusals are counted and logged at most once a minute. :func:`raise_fd_limit`
makes sure the caps of all listeners fit into the process's open-file limit, so accept() itself
never fails for want of one.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections import OrderedDict
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
    """Receives refusals and evictions (for metrics)."""

    def connection_refused(self, listener: str, reason: str) -> None:
        """A connection to ``listener`` was refused for ``reason`` (a :class:`Refusal`)."""

    def connection_evicted(self, listener: str, reason: str) -> None:
        """A connection to ``listener`` was closed for a newcomer (an :class:`Eviction`)."""


class Eviction:
    """Which kind of connection was closed to make room (metric label values)."""

    HALF_OPEN = "half_open"  # never got past its handshake
    IDLE = "idle"  # the longest idle one of the address holding the most


class Slot:
    """One admitted connection's place: what the choice of a victim looks at.

    ``established``: past its handshake (a station's registration, a first Modbus request, a
    first complete HTTP request head); before that it is half-open. ``protected``: it keeps its
    place whatever comes (a controller that wrote, a known station, an allowed network).
    ``busy``: the listener is serving a request on it now (an HTTP handler runs): not closed
    under it, but the slot is not protected once the answer is out.
    """

    __slots__ = (
        "_address",
        "_close",
        "_guard",
        "_limiter",
        "busy",
        "established",
        "host",
        "key",
        "last_active",
        "opened",
        "released",
    )

    def __init__(
        self,
        limiter: ConnectionLimiter,
        address: _Address,
        host: str,
        close: Callable[[], None],
        now: float,
    ) -> None:
        self._limiter = limiter
        self._address = address
        self.host = host
        self.key = address.key
        self._close = close
        self.opened = self.last_active = now
        self.established = False
        self.busy = False
        self._guard: Callable[[], bool] | bool = False
        self.released = False

    def touch(self) -> None:
        """The peer did something (a request, a report): it is not idle now."""
        self.last_active = self._limiter.clock()
        if not self.released:  # to the end of the idle orders: the longest idle come first
            self._limiter._idle.move_to_end(self)
            self._address.idle.move_to_end(self)

    def establish(self) -> None:
        """The connection is past its handshake: no longer among the first to go."""
        if not self.established:
            self.established = True
            self._limiter._half_open.pop(self, None)
            self._address.half_open.pop(self, None)
        self.touch()

    def protect(self, when: Callable[[], bool] | None = None) -> None:
        """Keep this connection's place: always, or while ``when()`` says so (asked when a
        victim is chosen, so that it follows e.g. the registry)."""
        self._guard = True if when is None else when

    @property
    def protected(self) -> bool:
        """True if no newcomer may take this place."""
        guard = self._guard
        return guard if isinstance(guard, bool) else guard()

    @property
    def closable(self) -> bool:
        """True if a newcomer may take this place (neither protected nor busy)."""
        return not self.busy and not self.protected

    def release(self) -> None:
        """Give the place back (idempotent: an evicted connection's was given back already)."""
        self._limiter._release(self)

    def evict(self) -> None:
        """Give the place back and close the connection."""
        self.release()
        self._close()


class _Address:
    """One address's (an IPv6 /64's) slots, in the orders the choice of a victim walks."""

    __slots__ = ("half_open", "idle", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.idle: OrderedDict[Slot, None] = OrderedDict()  # the longest idle first
        self.half_open: OrderedDict[Slot, None] = OrderedDict()  # the oldest first

    def victim(self) -> Slot | None:
        """Its oldest half-open slot that may go, else its longest idle one."""
        for slot in self.half_open:
            if slot.closable:
                return slot
        return self.longest_idle()

    def longest_idle(self) -> Slot | None:
        """Its longest idle slot that may go."""
        for slot in self.idle:
            if slot.closable:
                return slot
        return None


#: Addresses with the most slots that are compared one by one; more than this many tied, the
#: listener's idle order is walked instead (a flood from many addresses with one slot each).
_COMPARED_ADDRESSES = 8


@dataclass
class ConnectionLimiter:
    """Admits connections to one listener within its caps; release the slots it gives.

    When a cap is reached, a newcomer does not simply lose: the limiter closes another
    connection that matters less (:meth:`victim`) and admits the newcomer in its place. Only
    when every connection it could close is protected is the newcomer refused. Finding that
    connection takes a few steps, not one per connection: a flood of accepts must not cost a
    scan of every slot each.
    """

    listener: str  # "modbus", "evse", "http": for logs and metrics
    max_total: int
    max_per_address: int
    allow: tuple[Network, ...] | None = None  # None: every address may connect
    observer: LimiterObserver | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._slots: dict[Slot, None] = {}  # in the order they came
        # OrderedDicts: taking from the front and moving to the end stay O(1) under churn.
        self._half_open: OrderedDict[Slot, None] = OrderedDict()  # the oldest first
        self._idle: OrderedDict[Slot, None] = OrderedDict()  # the longest idle first
        self._by_address: dict[str, _Address] = {}
        self._holding: dict[int, set[str]] = {}  # number of slots -> the addresses holding it
        self._log_limit = RateLimit(1 / LOG_INTERVAL, burst=1, kind=f"{self.listener}_refused")
        self._evict_log = RateLimit(1 / LOG_INTERVAL, burst=1, kind=f"{self.listener}_evicted")

    @classmethod
    def unbounded(cls, listener: str) -> ConnectionLimiter:
        """A limiter that admits everyone (a listener used on its own, e.g. in tools)."""
        return cls(listener, max_total=2**31, max_per_address=2**31)

    @property
    def open(self) -> int:
        """Connections admitted and not released."""
        return len(self._slots)

    def slots(self) -> list[Slot]:
        """The admitted connections' slots, oldest first."""
        return list(self._slots)

    def admit(self, host: str, close: Callable[[], None]) -> Slot | None:
        """A slot for a connection from ``host`` (``close`` closes it, should it be evicted),
        making room if a cap is reached; None if it is refused (counted and logged)."""
        if self.allow is not None and not address_in(host, self.allow):
            self._refused(host, Refusal.NOT_ALLOWED)
            return None
        key = address_key(host)
        while (own := self._by_address.get(key)) and len(own.idle) >= self.max_per_address:
            victim = own.victim()
            if victim is None:
                self._refused(host, Refusal.PER_ADDRESS)
                return None
            self._evict(victim, host)
        while len(self._slots) >= self.max_total:
            victim = self.victim()
            if victim is None:
                self._refused(host, Refusal.TOTAL)
                return None
            self._evict(victim, host)
        address = self._by_address.get(key)
        if address is None:
            address = self._by_address[key] = _Address(key)
        slot = Slot(self, address, host, close, self.clock())
        self._move(key, len(address.idle), +1)
        self._slots[slot] = None
        self._half_open[slot] = None
        self._idle[slot] = None
        address.half_open[slot] = None
        address.idle[slot] = None
        return slot

    def victim(self) -> Slot | None:
        """The connection that goes when the listener is full: the oldest half-open one, else
        the longest idle one of the address that holds the most; never a protected or busy one."""
        for slot in self._half_open:
            if slot.closable:
                return slot
        for count in sorted(self._holding, reverse=True):
            keys = self._holding[count]
            if len(keys) <= _COMPARED_ADDRESSES:
                found = [s for k in keys if (s := self._by_address[k].longest_idle())]
                if found:
                    return min(found, key=lambda s: s.last_active)
            else:
                for slot in self._idle:
                    if len(self._by_address[slot.key].idle) == count and slot.closable:
                        return slot
        return None

    def _move(self, key: str, count: int, change: int) -> None:
        """Address ``key`` holds ``count + change`` slots now, not ``count``."""
        if count:
            holding = self._holding[count]
            holding.discard(key)
            if not holding:
                del self._holding[count]
        if count + change:
            self._holding.setdefault(count + change, set()).add(key)

    def _evict(self, victim: Slot, newcomer: str) -> None:
        reason = Eviction.IDLE if victim.established else Eviction.HALF_OPEN
        victim.evict()
        if self.observer is not None:
            self.observer.connection_evicted(self.listener, reason)
        now = self.clock()
        if self._evict_log.allow(now):
            log.warning(
                "%s: closed the %s connection from %s (open %.0f s, idle %.0f s) to admit one "
                "from %s (at most %d, %d per address)%s",
                self.listener,
                reason.replace("_", "-"),
                victim.host,
                now - victim.opened,
                now - victim.last_active,
                newcomer,
                self.max_total,
                self.max_per_address,
                self._evict_log.left_out(),
            )

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        del self._slots[slot]
        self._half_open.pop(slot, None)
        del self._idle[slot]
        address = self._by_address[slot.key]
        self._move(slot.key, len(address.idle), -1)
        address.half_open.pop(slot, None)
        del address.idle[slot]
        if not address.idle:
            del self._by_address[slot.key]

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
