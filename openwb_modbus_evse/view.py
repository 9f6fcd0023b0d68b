"""What every client is shown for a charge point at a time: one rule for all interfaces.

The Modbus registers, the openWB MQTT get/ topics, the metrics and the status page all render
:func:`show`; none decides freshness, the plug hold or the fault on its own, so during an outage
every controller hears the same story:

- **fresh** (data at most ``max_data_age`` old, plausible): everything as measured;
- **hold** (no fresh data, the last report at most :data:`PLUG_HOLD` old): power, currents,
  charging and offered current are 0, voltages unknown; *plugged keeps its last value*, so a
  Wi-Fi hiccup does not end a controller's charging session; fault: a warning (1). After
  ``PLUG_HOLD`` the station has switched itself off (its own safety timeout);
- **none** (no data, or older than that): as hold, but unplugged and an error (2).

A requested control-pilot interruption holds the pilot at state F (-12 V), which hides the
vehicle: while it lasts, the plug state from before is shown and no fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from . import chargepoint as cp
from .evse.protocol import STATION_SAFETY_TIMEOUT, StationData

#: How long the last plug state is shown after the data stops: after this long the station has
#: switched itself off.
PLUG_HOLD = STATION_SAFETY_TIMEOUT
FAULT_OK, FAULT_WARNING, FAULT_ERROR = 0, 1, 2
_ZERO3 = (0.0, 0.0, 0.0)


class Freshness(Enum):
    """Which of the rules above applies."""

    FRESH = "fresh"
    HOLD = "hold"
    NONE = "none"


class Viewable(Protocol):
    """A live charge point, or a frozen snapshot of one."""

    @property
    def identity(self) -> cp.Identity: ...
    @property
    def state(self) -> cp.State: ...
    @property
    def max_data_age(self) -> float: ...
    @property
    def energy_wh(self) -> float: ...


@dataclass(frozen=True)
class Shown:
    """A charge point as every client sees it."""

    freshness: Freshness
    data: StationData | None  # the fresh data (None unless FRESH)
    power_w: float
    phase_powers_w: tuple[float, float, float]
    currents_a: tuple[float, float, float]
    voltages_v: tuple[float | None, float | None, float | None]  # None: unknown
    plugged: bool
    charging: bool
    offered_a: float  # what the PWM offers now
    phases_in_use: int  # phases drawing current while charging
    max_current_a: float  # the station's limit, and the cable's if lower
    energy_wh: float
    fault: int  # FAULT_OK, FAULT_WARNING or FAULT_ERROR
    fault_text: str


def freshness(point: Viewable, now: float) -> Freshness:
    """Which rule applies to ``point`` at ``now``."""
    state = point.state
    if cp.fresh_data(state, now, point.max_data_age) is not None:
        return Freshness.FRESH
    if state.data_at is not None and now - state.data_at <= PLUG_HOLD:
        return Freshness.HOLD
    return Freshness.NONE


def next_change(point: Viewable) -> float | None:
    """When :func:`freshness` changes by time alone (None: it does not, until a change)."""
    state = point.state
    if state.data_at is None:
        return None
    if state.connected and state.data is not None and cp.implausible(state.data) is None:
        return state.data_at + point.max_data_age
    return state.data_at + PLUG_HOLD


def show(point: Viewable, now: float) -> Shown:
    """What ``point`` looks like to every client at ``now``."""
    state = point.state
    config = state.config
    shown = freshness(point, now)
    data = state.data
    if shown is not Freshness.FRESH or data is None:
        why = "is not connected" if not state.connected else "sends no valid data"
        held = shown is Freshness.HOLD and data is not None and _plugged(state, data)
        if shown is Freshness.HOLD:
            fault = (
                FAULT_WARNING,
                (
                    f"station {point.identity.name} {why}; its last plug state is kept for "
                    f"{PLUG_HOLD:g} s"
                ),
            )
        else:
            fault = FAULT_ERROR, f"station {point.identity.name} {why}"
        return Shown(
            shown,
            None,
            0.0,
            _ZERO3,
            _ZERO3,
            (None, None, None),
            held,
            False,
            0.0,
            0,
            config.max_current_a,
            point.energy_wh,
            *fault,
        )
    charging = cp.charging(state)
    cable_a = cp.cable_limit_ca(state) / 100
    v = data.voltages_mv
    i = data.currents_ma
    return Shown(
        shown,
        data,
        data.power_w,
        data.phase_powers_w,
        (i[0] / 1000, i[1] / 1000, i[2] / 1000),
        (v[0] / 1000, v[1] / 1000, v[2] / 1000),
        _plugged(state, data),
        charging,
        cp.offered_amps(data.pwm),
        sum(ma >= cp.STOPPED_MA for ma in i) if charging else 0,
        min(config.max_current_a, cable_a) if cable_a else config.max_current_a,
        point.energy_wh,
        *_fault(state, data),
    )


def _interrupted(state: cp.State) -> bool | None:
    """During a requested pilot interruption (until the station reports its PWM again): whether
    a vehicle was plugged in before it; None otherwise."""
    seq = state.sequence
    if seq is not None and seq.seconds is not None and seq.stage is cp.Stage.HOLD:
        return seq.plugged
    return state.resume_plugged


def _plugged(state: cp.State, data: StationData) -> bool:
    held = _interrupted(state)
    return data.pilot.plugged if held is None else held


def _fault(state: cp.State, data: StationData) -> tuple[int, str]:
    if data.pilot.is_fault and _interrupted(state) is None:
        return FAULT_ERROR, f"control-pilot fault (state {data.pilot.state})"
    if state.switch_failed:
        return FAULT_WARNING, "the phase-switch command failed: charging stays stopped"
    if state.enforce_heartbeat and state.heartbeat_lapsed:
        return FAULT_WARNING, (
            f"no heartbeat from the controller ({state.config.controller}): charging is stopped"
        )
    return FAULT_OK, ""
