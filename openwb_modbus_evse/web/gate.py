"""A bounded TCP front door for the HTTP server: connection caps and a connection lifetime.

aiohttp has no limit on connections and no timeout for a client that never finishes its request,
so every connection passes this gate first: over the total or per-address cap it gets a short
503 and is closed; admitted ones are handed to aiohttp and closed after ``max_age`` at the latest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\n\r\ntoo many connections\n"
)
_LOG_EVERY = 10.0  # seconds between two "refused" log lines: a flood must not flood the log


class Gate:
    """Counts open connections (in total and per client address) and admits or refuses."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        max_connections: int,
        max_per_address: int,
        max_age: float,
    ) -> None:
        self._factory = protocol_factory
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.max_age = max_age
        self._open: dict[asyncio.Transport, tuple[str, asyncio.TimerHandle]] = {}
        self.refused = 0  # connections refused so far
        self.peak = 0  # most connections open at once so far
        self._logged_at = -_LOG_EVERY

    def __call__(self) -> asyncio.Protocol:
        return _Doorman(self)

    @property
    def open_connections(self) -> int:
        """Connections admitted and not yet closed (read-only: also safe from another thread)."""
        return sum(1 for t in list(self._open) if not t.is_closing())

    def _prune(self) -> None:
        for transport in [t for t in self._open if t.is_closing()]:
            self._open.pop(transport)[1].cancel()

    def admit(self, transport: asyncio.Transport) -> bool:
        """Admit ``transport`` to aiohttp, or answer 503 and close it."""
        self._prune()
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        same = sum(1 for a, _ in self._open.values() if a == address)
        if len(self._open) >= self.max_connections or same >= self.max_per_address:
            self.refused += 1
            now = time.monotonic()
            if now - self._logged_at >= _LOG_EVERY:
                self._logged_at = now
                log.warning(
                    "HTTP: refusing connections (from %s: %d open, %d in total; %d refused so far)",
                    address,
                    same,
                    len(self._open),
                    self.refused,
                )
            transport.write(_BUSY)
            transport.close()
            return False
        timer = asyncio.get_running_loop().call_later(self.max_age, transport.close)
        self._open[transport] = (address, timer)
        self.peak = max(self.peak, len(self._open))
        protocol = self._factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return True

    def close_all(self) -> None:
        """Close every admitted connection."""
        for transport, (_, timer) in self._open.items():
            timer.cancel()
            transport.close()
        self._open.clear()


class _Doorman(asyncio.Protocol):
    """The first protocol of every connection: asks the gate, then steps aside."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._gate.admit(transport)

    def data_received(self, data: bytes) -> None:
        pass  # a refused connection's request is not read
