"""Imported energy, integrated from measured power over time."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EnergyMeter:
    """Trapezoidal integration of power samples into Wh; never decreases.

    Power only counts while the contactor is closed: with it open no energy can flow, and what a
    sensor shows then is noise. A gap longer than ``max_gap`` between samples (a lost station, a
    stalled poll) is skipped rather than filled with invented energy. Power above ``max_power_w``
    (what the station can deliver at most) counts as that maximum.
    """

    wh: float = 0.0
    max_power_w: float = math.inf
    _last: tuple[float, float] | None = None  # (time, power) of the previous sample

    def sample(self, power_w: float, contactor: bool, at: float, max_gap: float) -> None:
        """Count the energy since the previous sample."""
        power = min(max(0.0, power_w), self.max_power_w) if contactor else 0.0
        if self._last is not None:
            last_at, last_power = self._last
            if 0 < at - last_at <= max_gap:
                self.wh += (last_power + power) / 2 * (at - last_at) / 3600
        self._last = (at, power)

    def interrupt(self) -> None:
        """The next sample starts a new segment (the station went away)."""
        self._last = None
