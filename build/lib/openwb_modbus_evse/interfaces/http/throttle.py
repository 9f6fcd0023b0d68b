"""Answers made from live state in a worker thread, only as often as affordable, and shared.

/metrics and /api/status grow with the number of stations (for 200, ~40 ms of CPU each). Made on
the event loop, each would stall Modbus and the stations that long; made for every request, a
few clients hammering them would take the whole machine. So after a body took ``t`` seconds, the
next starts ``10 t`` (at most 1 s) later at the earliest, and every request that arrives meanwhile
waits for it and shares it: no request gets values from before its arrival, and any number of
clients cost about a tenth of a core. From the worker thread the loop gets the GIL back every
few milliseconds. The thread only encodes a frozen snapshot that ``take`` made on the event loop
when the body was started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")

COST_FACTOR = 10.0  # the next body waits this many times the cost of the last one ...
MAX_WAIT = 1.0  # ... but at most this many seconds


class Throttled(Generic[T]):
    """One body (bytes): ``encode(take())``, the encoding in ``worker``; see the module's
    docstring."""

    def __init__(
        self,
        take: Callable[[], T],
        encode: Callable[[T], bytes],
        worker: Executor,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._take = take
        self._encode = encode
        self._worker = worker
        self._clock = clock
        self._next_at = -float("inf")  # the earliest time the next body may be made
        self._pending: asyncio.Future[bytes] | None = None  # for requests waiting, not started
        self._running: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.made = 0  # how many bodies were made (for tests and the bench)

    async def body(self) -> bytes:
        """A fresh body, shared with the requests that arrived while it was due."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_future()
            if self._running is None:
                self._schedule()
        return await asyncio.shield(self._pending)

    def _schedule(self) -> None:
        delay = max(0.0, self._next_at - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        future, self._pending = self._pending, None
        assert future is not None
        self._running = asyncio.ensure_future(self._run(future))

    async def _run(self, future: asyncio.Future[bytes]) -> None:
        try:
            taken = self._take()
            body = await asyncio.get_running_loop().run_in_executor(self._worker, self._make, taken)
        except Exception as err:  # a bug in a producer: the waiting requests get a 500
            future.set_exception(err)
        else:
            future.set_result(body)
        finally:
            self._running = None
            if self._pending is not None:  # requests that came while this one was made
                self._schedule()

    def _make(self, taken: T) -> bytes:
        started = self._clock()
        body = self._encode(taken)
        done = self._clock()
        self._next_at = done + min(MAX_WAIT, COST_FACTOR * (done - started))
        self.made += 1
        return body

    def close(self) -> None:
        """Make no more bodies (the worker is its owner's to shut down)."""
        if self._timer is not None:
            self._timer.cancel()
