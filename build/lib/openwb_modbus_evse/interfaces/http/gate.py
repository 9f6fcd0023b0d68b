"""A bounded front door for the HTTP server: connection caps and a connection lifetime.

aiohttp has no limit on connections and no timeout for a client that never finishes its request,
so every connection passes this gate first. It takes a slot from the listener's
:class:`~..limits.ConnectionLimiter` (over a cap: a short 503, then closed), hands the connection
to aiohttp, gives the slot back when the connection is lost, and closes it after ``max_age`` at
the latest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from ...limits import ConnectionLimiter, host_of

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\n\r\ntoo many connections\n"
)


class Gate:
    """The protocol factory to listen with: admits within ``limiter``, then aiohttp serves."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        limiter: ConnectionLimiter,
        max_age: float,
    ) -> None:
        self._factory = protocol_factory
        self.limiter = limiter
        self.max_age = max_age
        self.peak = 0  # most connections open at once so far
        self._open: set[asyncio.Transport] = set()

    def __call__(self) -> asyncio.Protocol:
        return _Doorman(self)

    def close_all(self) -> None:
        """Close every admitted connection."""
        for transport in list(self._open):
            transport.close()


class _Doorman(asyncio.Protocol):
    """Takes a slot for the connection, then passes every event on to aiohttp's protocol."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None
        self._host = ""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an asyncio.Transport instance under uvloop, so no isinstance.
        transport = cast(asyncio.Transport, transport)
        gate = self._gate
        self._host = host_of(transport.get_extra_info("peername"))
        if gate.limiter.admit(self._host) is not None:
            transport.write(_BUSY)
            transport.close()
            return
        self._transport = transport
        gate._open.add(transport)
        gate.peak = max(gate.peak, len(gate._open))
        self._timer = asyncio.get_running_loop().call_later(gate.max_age, transport.close)
        self._inner = gate._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        assert self._timer is not None and self._transport is not None
        self._timer.cancel()
        self._gate._open.discard(self._transport)
        self._gate.limiter.release(self._host)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:  # a refused connection's request is not read
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
