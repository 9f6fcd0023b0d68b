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


def next_change(point: Viewable, now: float) -> float | None:
    """When, after ``now``, :func:`freshness` changes by time alone (None: it does not, until
    the state changes)."""
    state = point.state
    if state.data_at is None:
        return None
    times = [state.data_at + PLUG_HOLD]
    if state.connected and state.data is not None and cp.implausible(state.data) is None:
        times.append(state.data_at + point.max_data_age)
    return min((t for t in times if t > now), default=None)


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
        cp.measured_phases(state),
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


# --- why not charging ------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatInfo:
    """The heartbeat of the controller that drives a charge point, as :func:`reasons` needs it."""

    what: str  # what refreshes it, e.g. "Modbus request"
    age_s: float  # seconds since the last request
    timeout_s: float
    received: bool  # a request has come since start-up
    source: str = ""  # where the last request came from (a client address; "" unknown)


@dataclass(frozen=True)
class Reason:
    """Why a charge point does not charge (``blocking``), or charges less than asked."""

    code: str
    text: str
    blocking: bool = True


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds // 60 % 60} min"


def _amps(centiamps: int) -> str:
    return f"{centiamps / 100:g} A"


def reasons(
    point: Viewable,
    now: float,
    heartbeat: HeartbeatInfo | None = None,
    last_disconnect: tuple[float, str] | None = None,
    claim: str | None = None,
) -> list[Reason]:
    """Why ``point`` does not charge at ``now``, in the state machine's own terms, the one that
    blocks first; then what limits the current below the request. Empty: it charges as asked.

    ``heartbeat`` is that of its controller (None: the controller runs none);
    ``last_disconnect`` when and why its station's last session ended; ``claim`` where a peer
    connects from that claims the station's ID, unconfirmed (identity.py).
    """
    state = point.state
    config = state.config
    data = state.data
    found: list[Reason] = []
    if claim is not None:
        text = (
            f"a device at {claim} connects with this station's ID, but the station was last seen "
            "elsewhere: it is held safe and not served until the owner confirms that it is this "
            "station"
        )
        return [Reason("unconfirmed_peer", text)]
    if not state.connected:
        if state.data_at is None and last_disconnect is None:
            return [Reason("offline", "the station has not connected since the service started")]
        since = last_disconnect[0] if last_disconnect else state.data_at
        assert since is not None
        why = f" ({last_disconnect[1]})" if last_disconnect else ""
        return [Reason("offline", f"the station is offline for {_ago(now - since)}{why}")]
    if point.identity.lp is None:
        text = (
            "the station is not served (all LPs taken, or not in known_stations with "
            'unknown_stations = "hold"): it is kept safe'
        )
        return [Reason("not_served", text)]
    if data is None or state.data_at is None:
        return [Reason("no_data", "the station is connected but has not reported yet")]
    problem = cp.implausible(data)
    if problem is not None:
        return [Reason("fault", f"implausible report, treated as a fault: {problem}")]
    if now - state.data_at > point.max_data_age:
        return [Reason("no_data", f"no report from the station for {_ago(now - state.data_at)}")]
    seq = state.sequence
    if data.pilot.is_fault and _interrupted(state) is None:
        found.append(Reason("fault", f"control-pilot fault (state {data.pilot.state})"))
    if state.switch_failed:
        found.append(
            Reason(
                "fault",
                "the phase-switch command failed: charging stays stopped until the "
                "next phase switch",
            )
        )
    if seq is not None:
        if seq.seconds is not None:
            left = f": {_ago(seq.until - now)} left" if seq.until is not None else ""
            stage = "stopping first" if seq.stage is cp.Stage.STOPPING else f"state F{left}"
            found.append(
                Reason("cp_interruption", f"pilot interruption of {seq.seconds} s, {stage}")
            )
        else:
            found.append(
                Reason("phase_switch", f"phase switch to {seq.phases} phase(s): {seq.stage.value}")
            )
    elif state.resume_plugged is not None:  # the station still shows state F
        found.append(
            Reason("cp_interruption", "pilot interruption over: waiting for the station to resume")
        )
    if found:
        return found
    if not _plugged(state, data):
        return [Reason("no_vehicle", "no vehicle is plugged in")]
    controller = config.controller
    limits: list[Reason] = []
    if state.enforce_heartbeat and state.heartbeat_lapsed:
        if heartbeat is None:
            code = "heartbeat_none"
            text = f"the controller {controller} is not running: no heartbeat"
        elif not heartbeat.received:
            code = "heartbeat_none"
            text = f"no heartbeat from the controller {controller} yet (its first {heartbeat.what})"
        else:
            code = "heartbeat_lapsed"
            text = (
                f"the controller {controller}'s heartbeat lapsed: no {heartbeat.what} for "
                f"{_ago(heartbeat.age_s)} (timeout {heartbeat.timeout_s:g} s)"
            )
        failsafe = min(config.failsafe_ca, state.requested_ca)
        if failsafe < cp.MIN_CURRENT_CA:
            return [Reason(code, text)]
        # failsafe_current: charging goes on, at most at that current, until it comes back.
        limits.append(
            Reason(code, f"{text}; the failsafe current {_amps(failsafe)} applies", False)
        )
    if state.requested_ca == 0:
        who = (
            "the owner stopped charging (manual)"
            if controller == "manual"
            else (f"the controller {controller} requests no current")
        )
        return [Reason("no_current", who)]
    cable = cp.cable_limit_ca(state)
    if cable == 0:
        return [Reason("cable", "no charging cable is detected (or its coding is unknown)")]
    if not state.contactor_allowed:
        return [Reason("contactor", f"the controller {controller} keeps the contactor open")]
    demand = cp.demand_ca(state)
    if demand == 0:
        return [Reason("limit", "the station's limits leave less than 6 A")]
    cap = state.supply_cap_ca
    if cap is not None and cap < cp.MIN_CURRENT_CA:
        return [
            Reason(
                "supply", "the shared supply has no share for this station now: it waits its turn"
            )
        ]
    if cap is not None and cap < demand:
        limits.append(Reason("supply", f"the shared supply grants {_amps(cap)}", False))
    if cable < state.requested_ca:
        limits.append(Reason("cable", f"the cable allows {_amps(cable)}", False))
    station_ca = round(config.max_current_a * 100)
    if station_ca < state.requested_ca:
        limits.append(Reason("station", f"the station allows {_amps(station_ca)}", False))
    if cp.charging(state):
        if not cp.drawing(state):
            limits.insert(0, Reason("vehicle_idle", "the vehicle draws no current now", False))
        return limits
    if state.closed_not_before is not None and not data.contactor:
        left = _ago(state.closed_not_before - now)
        text = f"the contactor rests after opening (contactor_min_off): {left} left"
        return [Reason("contactor_wait", text), *limits]
    if cp.offered_amps(data.pwm) == 0:
        return [Reason("pwm_pending", "waiting for the station to offer the current"), *limits]
    if not data.pilot.requests_power:
        text = "the vehicle does not ask for power (state B): full, or waiting for its own timer"
        return [Reason("vehicle_not_asking", text), *limits]
    return [Reason("contactor_closing", "the contactor is about to close"), *limits]
