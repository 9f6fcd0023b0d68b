"""The controller heartbeat: one clock for the whole server, refreshed by any Modbus request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Heartbeat:
    """Lapses when no request came for ``timeout`` seconds; recovers with the next request.

    ``on_change(lapsed)`` is called on every lapse and recovery.
    """

    def __init__(
        self,
        timeout: float,
        clock: Callable[[], float],
        on_change: Callable[[bool], None],
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        self._on_change = on_change
        self.last_request = clock()  # start-up counts as a request: a grace period
        self.lapsed = False
        self.lapses = 0
        self.recoveries = 0
        self._recovered = asyncio.Event()

    @property
    def deadline(self) -> float:
        """When the heartbeat lapses unless a request comes first."""
        return self.last_request + self.timeout

    def age(self) -> float:
        """Seconds since the last request."""
        return self._clock() - self.last_request

    def refresh(self) -> None:
        """A request arrived."""
        self.last_request = self._clock()
        if self.lapsed:
            self.lapsed = False
            self.recoveries += 1
            log.info("heartbeat: requests are back; the requested currents apply again")
            self._recovered.set()
            self._on_change(False)

    async def watch(self) -> None:
        """Lapse the heartbeat at its deadline; runs until cancelled."""
        while True:
            delay = self.deadline - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            self.lapsed = True
            self.lapses += 1
            log.warning(
                "heartbeat: no Modbus request for %g s; charging stops where it is enforced",
                self.timeout,
            )
            self._recovered.clear()
            self._on_change(True)
            await self._recovered.wait()
