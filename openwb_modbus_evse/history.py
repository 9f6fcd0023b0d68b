"""The power chart's data: one sample per charge point every few seconds, for the last hour.

Kept in memory only (a restart starts an empty chart) and bounded: a fixed number of samples
per charge point, and the series of a charge point that no longer exists is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

SAMPLE_INTERVAL = 5.0  # seconds between two samples: the default poll interval
WINDOW = 3600.0  # seconds shown


class PowerHistory:
    """Ring buffers of (unix time, watts or None for "no data") per station serial."""

    def __init__(self, interval: float = SAMPLE_INTERVAL, window: float = WINDOW) -> None:
        self.interval = interval
        self.size = int(window / interval) + 1
        self._series: dict[str, deque[tuple[float, float | None]]] = {}

    def sample(self, powers: Iterable[tuple[str, float | None]], at: float) -> None:
        """Add one sample per station; stations not among ``powers`` lose their series."""
        seen = set()
        for serial, watts in powers:
            seen.add(serial)
            series = self._series.get(serial)
            if series is None:
                series = self._series[serial] = deque(maxlen=self.size)
            series.append((at, None if watts is None else round(watts)))
        for serial in set(self._series) - seen:
            del self._series[serial]

    def series(self, serial: str) -> list[tuple[float, float | None]]:
        """The samples of one station, oldest first."""
        return list(self._series.get(serial, ()))
