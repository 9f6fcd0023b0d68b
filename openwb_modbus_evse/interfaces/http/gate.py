"""A bounded front door for the HTTP server: connection caps and a connection lifetime.

aiohttp has no limit on connections and no timeout for a client that never finishes its request,
so every connection passes this gate first. It takes a slot from the listener's
:class:`~..limits.ConnectionLimiter` (when full, the limiter closes a half-open or the longest
idle connection of the address holding the most; with nothing to close: a short 503, then
closed), hands the connection to aiohttp, gives the slot back when the connection is lost, and
closes it after ``max_age`` at the latest. A connection is half-open until the head of its
first request is complete (closed for a newcomer, it gets the same 503), busy while a handler
runs (never closed under a running request: :func:`busy_while`), and otherwise idle since its
last bytes. No HTTP connection is protected: a scraper reconnects, and
the rule alone keeps a flood from locking it out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web

from ...limits import ConnectionLimiter, Slot, host_of

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\n\r\ntoo many connections\n"
)
_HEAD_END = b"\r\n\r\n"


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
        self._open: dict[asyncio.BaseTransport, Slot] = {}

    def __call__(self) -> asyncio.Protocol:
        return _Doorman(self)

    def slot_of(self, transport: asyncio.BaseTransport | None) -> Slot | None:
        """The limiter's slot of an admitted connection."""
        return self._open.get(transport) if transport is not None else None

    def close_all(self) -> None:
        """Close every admitted connection."""
        for transport in list(self._open):
            transport.close()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def busy_while(gate: Callable[[], Gate | None]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware (the outermost): the connection is busy while its request is
    handled, so a newcomer never closes it under a running request.

    Not while the answer is written: a client that does not read it would hold its place for
    the connection's whole lifetime. An answer that fits the transport's buffer is written
    without yielding to the event loop, so no newcomer comes in between.
    """

    @web.middleware
    async def busy(request: web.Request, handler: Handler) -> web.StreamResponse:
        current = gate()
        slot = current.slot_of(request.transport) if current is not None else None
        if slot is None:
            return await handler(request)
        slot.busy = True
        try:
            return await handler(request)
        finally:
            slot.busy = False
            slot.touch()

    return busy


class _Doorman(asyncio.Protocol):
    """Takes a slot for the connection, then passes every event on to aiohttp's protocol."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None
        self._host = ""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._slot: Slot | None = None
        self._tail = b""  # the last bytes before the first head is complete (split "\r\n\r\n")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an asyncio.Transport instance under uvloop, so no isinstance.
        transport = cast(asyncio.Transport, transport)
        gate = self._gate
        self._host = host_of(transport.get_extra_info("peername"))
        self._slot = slot = gate.limiter.admit(self._host, self._evicted)
        if slot is None:
            transport.write(_BUSY)
            transport.close()
            return
        self._transport = transport
        gate._open[transport] = slot
        gate.peak = max(gate.peak, gate.limiter.open)
        self._timer = asyncio.get_running_loop().call_later(gate.max_age, transport.close)
        self._inner = gate._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        assert self._timer is not None and self._transport is not None
        self._timer.cancel()
        self._gate._open.pop(self._transport, None)
        assert self._slot is not None
        self._slot.release()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:  # a refused connection's request is not read
            return
        slot = self._slot
        assert slot is not None
        slot.touch()
        if not slot.established:
            # The head of its first request is complete. Busy only once aiohttp runs the
            # handler (busy_while): a client that sent a head aiohttp does not take yet (its
            # previous answer unread) must not be able to hold its place with it.
            seen = self._tail + data
            if _HEAD_END in seen:
                slot.establish()
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def _evicted(self) -> None:
        """Closed to make room: a connection without a request gets the refusal's 503."""
        transport = self._transport
        assert transport is not None and self._slot is not None
        if self._slot.established:
            transport.abort()  # idle: nothing is lost
        else:
            transport.write(_BUSY)
            transport.close()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
