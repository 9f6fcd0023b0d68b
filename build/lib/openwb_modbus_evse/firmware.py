"""Firmware update of a station (an operator action): send the image, wait for the restart.

LP, energy counter and settings belong to the charge point, which outlives the session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import chargepoint as cp
from .actions import ActionError, ActionErrorKind
from .evse.link import SessionClosed
from .evse.protocol import MAX_FIRMWARE_SIZE
from .registry import Registry

log = logging.getLogger(__name__)


class FirmwareUpdater:
    """Runs at most one update per station."""

    def __init__(self, registry: Registry, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock
        self._running: set[str] = set()  # serials with an update running

    async def update(self, serial: str, image: bytes, timeout: float) -> dict[str, object]:
        """Send ``image`` to a station that is not charging; done once it has reconnected."""
        if not image:
            raise ActionError(ActionErrorKind.BAD_REQUEST, "the firmware image is empty")
        if len(image) > MAX_FIRMWARE_SIZE:
            raise ActionError(
                ActionErrorKind.TOO_LARGE,
                f"the image has {len(image)} bytes; a station holds at most {MAX_FIRMWARE_SIZE}",
            )
        registry = self._registry
        point = registry.get(serial)
        if point is None:
            raise ActionError(ActionErrorKind.NOT_FOUND, f"no station {serial}")
        session = registry.session(serial)
        if session is None:
            raise ActionError(ActionErrorKind.CONFLICT, f"{point.name} is not connected")
        if serial in self._running:
            raise ActionError(ActionErrorKind.CONFLICT, f"an update of {point.name} is running")

        def check() -> None:
            # Also called just before the image goes out: the vehicle may have started since.
            if cp.busy(point.state):
                raise ActionError(
                    ActionErrorKind.CONFLICT,
                    f"firmware update refused: {point.name} is charging or its contactor is "
                    "closed; stop it first",
                )

        check()
        registry.remember(point)  # an operator updates it: it keeps its LP across the restart
        self._running.add(serial)
        try:
            started = self._clock()
            try:
                await session.upload_firmware(image, check)
            except SessionClosed as err:
                raise ActionError(ActionErrorKind.FAILED, f"connection lost: {err}") from None
            log.info("station %s: firmware image of %d bytes sent", point.name, len(image))
            while self._clock() - started < timeout:
                current = registry.session(serial)
                if current is not None and current is not session:
                    return {
                        "firmware_before": session.firmware,
                        "firmware_after": current.firmware,
                        "seconds": round(self._clock() - started, 1),
                    }
                await asyncio.sleep(0.05)
        finally:
            self._running.discard(serial)
        if not session.closed:
            raise ActionError(
                ActionErrorKind.FAILED,
                f"{point.name} did not restart within {timeout:g} s: it is still connected, so "
                "it probably refused the image",
            )
        raise ActionError(
            ActionErrorKind.FAILED,
            f"{point.name} dropped the connection and did not come back within {timeout:g} s",
        )
