"""A controller's heartbeat: one clock per controller (Modbus requests, an openWB primary's
global_data), applied by its owner to the charge points that controller drives."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable


class Heartbeat:
    """Lapses when no request came for ``timeout`` seconds; recovers with the next request.

    ``on_change(lapsed)`` is called on every lapse and recovery. ``what`` names the requests in
    the log. ``lapsed=True`` starts lapsed (no grace period: charging waits for the first
    request), otherwise start-up counts as a request.

    A controller whose presence is told by events, not by time (Home Assistant's status), has a
    ``timeout`` of ``math.inf`` and is lapsed by :meth:`lapse`.
    """

    def __init__(
        self,
        timeout: float,
        clock: Callable[[], float],
        on_change: Callable[[bool], None],
        *,
        what: str = "Modbus request",
        lapsed: bool = False,
    ) -> None:
        self.timeout = timeout
        self.what = what
        self._clock = clock
        self._on_change = on_change
        self.last_request = clock()
        self.lapsed = lapsed
        self.source = ""  # where the last request came from
        self.lapse_reason = ""  # why lapse() lapsed it (empty: a timeout)
        self.lapses = 0
        self.recoveries = 0
        self.received = False  # a request has come since start-up
        self._recovered = asyncio.Event()

    @property
    def deadline(self) -> float:
        """When the heartbeat lapses unless a request comes first."""
        return self.last_request + self.timeout

    def age(self) -> float:
        """Seconds since the last request."""
        return self._clock() - self.last_request

    def refresh(self, source: str = "") -> None:
        """A request arrived (from ``source``, e.g. a client address, shown on the page)."""
        self.last_request = self._clock()
        self.source = source
        self.received = True
        if self.lapsed:
            self.lapsed = False
            self.recoveries += 1
            self._recovered.set()
            self._on_change(False)

    def check(self) -> bool:
        """Lapse if the deadline has passed; True if it lapsed just now."""
        if self.lapsed or self._clock() < self.deadline:
            return False
        self.lapsed = True
        self.lapses += 1
        self.lapse_reason = ""
        self._recovered.clear()
        self._on_change(True)
        return True

    def lapse(self, why: str) -> None:
        """The controller is known to be gone (``why``, for the log): lapse now."""
        if self.lapsed:
            return
        self.lapsed = True
        self.lapses += 1
        self.lapse_reason = why
        self._recovered.clear()
        self._on_change(True)

    async def watch(self) -> None:
        """Lapse the heartbeat at its deadline; runs until cancelled."""
        if math.isinf(self.timeout):
            return  # no deadline: only lapse() lapses it
        while True:
            if self.lapsed or self.check():
                await self._recovered.wait()
            else:
                await asyncio.sleep(max(0.0, self.deadline - self._clock()))
