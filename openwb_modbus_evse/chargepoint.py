"""One charge point: what its station reports, and the charging-control state machine.

The control logic is pure: every function takes the state and the time (``now``, seconds on a
monotonic clock) and returns a new state or a decision. Nothing here reads a clock or does I/O,
so the safety rules can be checked step by step with a fake clock and with hypothesis.

The IEC 61851 sequence this follows (see the protocol page):
- a current is offered by PWM; the contactor closes only while the vehicle asks for power (C/D)
  and a current is offered;
- to stop, PWM goes to 100 % first; the contactor opens once the vehicle has stopped drawing (or
  after ``stop_timeout``), and only after the station reports PWM 100 %;
- unplug (A) or a pilot fault opens the contactor and sets PWM 100 % at once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum

from .energy import EnergyMeter
from .evse.protocol import STATION_SAFETY_TIMEOUT, Pilot, Proximity, StationData, Target
from .ratelimit import RateLimit

log = logging.getLogger(__name__)

MIN_CURRENT_CA = 600  # centiamps, the unit of the set_current register
MAX_CURRENT_CA = 3200
PWM_OFF = 100  # constant +12 V: no charging allowed
PWM_STATE_F = 0  # constant -12 V: the EVSE signals an error; used for pilot interruption
CA_PER_PWM_PERCENT = 60  # IEC 61851-1: amps = duty cycle * 0.6
MIN_CHARGING_PWM = 10
# Below this on every phase the vehicle counts as no longer drawing: cars keep some electronics
# powered, so exactly zero never comes.
STOPPED_MA = 1000
CP_INTERRUPTION_MAX_S = 60
# After its last report, a station may still get commands for this long (the link collects data
# right after every command and gives up on an answer after 5 s).
SAFETY_MARGIN_S = 60.0
# What a 230/400 V station rated up to 32 A can really measure, with headroom: a phase voltage
# above 300 V (230 V + 30 %) or a current above 64 A (twice the largest rating) is a broken
# sensor, a bad calibration or a forged frame, never a reading to count or act on.
MAX_PLAUSIBLE_MV = 300_000
MAX_PLAUSIBLE_MA = 64_000
RECENT_LOG_LINES = 20  # station log lines kept per charge point (for the status page)


@dataclass(frozen=True)
class ChargePointConfig:
    """What is fixed about a charge point: its hardware and its timings."""

    max_current_a: float = 32.0
    cable: str = "socket"  # "socket": no cable, no current; "tethered": the cable is fixed
    phases: int = 3  # how the station is wired
    can_switch_phases: bool = False  # an external phase-switch command is configured
    stop_timeout: float = 6.0  # how long to wait for the vehicle before opening under load
    phase_switch_pause: float = 5.0
    controller: str = "modbus"  # the only interface whose writes are accepted (config.CONTROLLERS)
    supply_limited: bool = False  # stations share a supply: offer only its grant (supply.py)
    contactor_min_off: float = 0.0  # least time between the contactor opening and closing again
    # The controller switches the contactor (bridge-mqtt): it stays open until allowed.
    contactor_by_request: bool = False
    failsafe_ca: int = 0  # offered while the controller's heartbeat is lapsed (0: stop)
    # The controller keeps a heartbeat; the owner's manual override has none: its choice stays.
    heartbeat: bool = True


class Stage(StrEnum):
    """Where a phase switch or a pilot interruption stands."""

    STOPPING = "stopping"  # charging stops the normal way; waits for an open contactor
    READY = "ready"  # phase switch: contactor open, the command may run
    SWITCHING = "switching"  # phase switch: the command runs
    PAUSE = "pause"  # phase switch: wait before resuming
    HOLD = "hold"  # pilot interruption: PWM 0 % (state F) until ``until``


@dataclass(frozen=True)
class Sequence:
    """A phase switch (``phases`` set) or a pilot interruption (``seconds`` set) in progress."""

    stage: Stage
    phases: int | None = None
    seconds: int | None = None
    until: float | None = None
    # Stages advance only on reports numbered above this: a report requested before the
    # sequence began may predate a contactor command still in flight.
    after_report: int = 0
    # Pilot interruption: whether a vehicle was plugged in when the hold began (state F hides it).
    plugged: bool = False

    @property
    def kind(self) -> str:
        """``phase_switch`` or ``cp_interruption``."""
        return "phase_switch" if self.phases is not None else "cp_interruption"


class RefusalKind(StrEnum):
    """Why a command was refused."""

    BAD_VALUE = "bad_value"
    BUSY = "busy"
    OFFLINE = "offline"
    NOT_CONTROLLER = "not_controller"


class Refused(Exception):
    """A command that cannot be carried out; nothing was changed."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class State:
    """Everything the control decisions depend on."""

    config: ChargePointConfig = ChargePointConfig()
    requested_ca: int = 0  # last set_current written; kept through lapses and sequences
    contactor_allowed: bool = True  # the controller lets the contactor close
    enforce_heartbeat: bool = True
    heartbeat_lapsed: bool = False
    phases: int = 3  # phases in use (differs from the wiring after a phase switch)
    phase_target: int | None = None  # written to phase_target, applied by the trigger
    sequence: Sequence | None = None
    switch_failed: bool = False  # the last phase-switch command failed: stay stopped
    stop_since: float | None = None  # when stopping under load began
    # Until when the contactor must stay open: set when a report shows it opened, cleared once
    # contactor_min_off has passed.
    closed_not_before: float | None = None
    data: StationData | None = None
    data_at: float | None = None
    reports: int = 0  # data reports received so far
    connected: bool = False
    # The shared supply's grant (centiamps; None: no supply limit), and the highest grant since the
    # latest report: a command sent under an older, higher grant may be in effect until the next
    # report shows otherwise (the first report after a change reflects every command before it).
    supply_cap_ca: int | None = None
    supply_exposure_ca: int = 0
    # A pilot interruption has ended but the station still reports state F (PWM 0): whether a
    # vehicle was plugged in before it (None: no interruption is ending).
    resume_plugged: bool | None = None


def initial_state(config: ChargePointConfig) -> State:
    """A charge point after start-up: nothing requested, heartbeat enforced."""
    return State(
        config=config,
        phases=config.phases,
        supply_cap_ca=0 if config.supply_limited else None,
        contactor_allowed=not config.contactor_by_request,
        enforce_heartbeat=config.heartbeat,
    )


# --- decisions -------------------------------------------------------------------------------


def cable_limit_ca(state: State) -> int:
    """The most the cable allows (centiamps); 0 where nothing may be offered."""
    data = state.data
    if data is None:
        return 0
    amps = data.proximity.amps
    if amps is not None:
        return amps * 100
    if data.proximity is Proximity.NO_CABLE and state.config.cable == "tethered":
        return MAX_CURRENT_CA  # a fixed cable without a coding resistor: the station limit applies
    return 0  # socket without a cable, or an unknown reading


def allowed_ca(state: State) -> int:
    """The current the controller allows right now (centiamps), before hardware limits."""
    if state.sequence is not None or state.switch_failed:
        return 0
    if state.enforce_heartbeat and state.heartbeat_lapsed:
        # Never more than the controller last asked for: a pause stays a pause.
        return min(state.config.failsafe_ca, state.requested_ca)
    return state.requested_ca


def offered_pwm(state: State) -> int:
    """Duty cycle to offer: floor(amps / 0.6) capped by cable and station, or 100 % for none."""
    limit = min(
        demand_ca(state), MAX_CURRENT_CA if state.supply_cap_ca is None else state.supply_cap_ca
    )
    if limit < MIN_CURRENT_CA:
        return PWM_OFF
    return max(MIN_CHARGING_PWM, limit // CA_PER_PWM_PERCENT)


def demand_ca(state: State) -> int:
    """The most this station may offer by its own limits (controller, cable, station), or 0."""
    limit = min(allowed_ca(state), cable_limit_ca(state), round(state.config.max_current_a * 100))
    return limit if limit >= MIN_CURRENT_CA else 0


def supply_demand_ca(state: State) -> int:
    """What the station asks of a shared supply: its demand while a vehicle is plugged in."""
    data = state.data
    if not state.connected or data is None or not data.pilot.plugged:
        return 0
    return demand_ca(state)


def drawing(state: State) -> bool:
    """The vehicle draws current, per the latest data."""
    data = state.data
    return charging(state) and data is not None and max(data.currents_ma) >= STOPPED_MA


def exposure_ca(state: State, now: float) -> int:
    """The most the station may be offering now: its reported PWM, or a grant not yet reported.

    A station that has been away longer than its own safety timeout has switched off by itself
    (counted from its last report, plus a margin for commands sent after it).
    """
    if not state.connected and (
        state.data_at is None or now - state.data_at > STATION_SAFETY_TIMEOUT + SAFETY_MARGIN_S
    ):
        return 0
    reported = round(offered_amps(state.data.pwm) * 100) if state.data else 0
    return max(reported, state.supply_exposure_ca)


def implausible(data: StationData) -> str | None:
    """Why the report's measurements cannot be real (see MAX_PLAUSIBLE_*), or None."""
    for i, mv in enumerate(data.voltages_mv):
        if mv > MAX_PLAUSIBLE_MV:
            return f"phase {i + 1} voltage {mv / 1000:g} V is above {MAX_PLAUSIBLE_MV // 1000} V"
    for i, ma in enumerate(data.currents_ma):
        if ma > MAX_PLAUSIBLE_MA:
            return f"phase {i + 1} current {ma / 1000:g} A is above {MAX_PLAUSIBLE_MA // 1000} A"
    return None


def target(state: State, now: float) -> Target | None:
    """What the station should do now; None while there is no station to command."""
    data = state.data
    if data is None or not state.connected:
        return None
    if state.sequence is not None and state.sequence.stage is Stage.HOLD:
        return Target(PWM_STATE_F, False)
    if data.pilot is Pilot.A_12V or data.pilot.is_fault or implausible(data) is not None:
        # Impossible measurements: nothing the report says can be trusted, like a pilot fault.
        return Target(PWM_OFF, False)
    pwm = offered_pwm(state)
    if pwm != PWM_OFF and (state.contactor_allowed or not data.contactor):
        # Close only once the station itself reports a charging PWM: a station that did not
        # apply the PWM must not get a closed contactor under a vehicle that asks anyway; and
        # not again before contactor_min_off has passed since it opened (the closing waits).
        may_close = offered_amps(data.pwm) > 0 and state.closed_not_before is None
        close = state.contactor_allowed and (data.contactor or may_close)
        return Target(pwm, data.pilot.requests_power and close)
    # Stopping (also a contactor the controller no longer allows): PWM 100 % until it is open;
    # then the current is offered again with the contactor open, if one is allowed.
    return Target(PWM_OFF, data.contactor and not _vehicle_released(state, now))


def _vehicle_released(state: State, now: float) -> bool:
    """While stopping: may the contactor open? Only once the station reports PWM 100 %."""
    data = state.data
    assert data is not None
    if data.pwm != PWM_OFF:
        return False
    if not data.pilot.requests_power or max(data.currents_ma) < STOPPED_MA:
        return True
    return state.stop_since is not None and now - state.stop_since >= state.config.stop_timeout


def offered_amps(pwm: int) -> float:
    """Current a PWM duty cycle offers (IEC 61851-1); 0 outside the charging range."""
    if MIN_CHARGING_PWM <= pwm <= 85:
        return pwm * CA_PER_PWM_PERCENT / 100
    if 85 < pwm <= 96:
        return (pwm - 64) * 2.5
    return 0.0


def charging(state: State) -> bool:
    """Contactor closed and the vehicle asks for power, per the latest data."""
    data = state.data
    return data is not None and data.contactor and data.pilot.requests_power


def measured_phases(state: State) -> int:
    """The phases the vehicle draws current on, per the latest data; 0 unless charging."""
    data = state.data
    if data is None or not charging(state):
        return 0
    return sum(ma >= STOPPED_MA for ma in data.currents_ma)


def phases_in_use(state: State) -> int:
    """The phases the station really uses: as measured while the vehicle draws current, else
    those of the last switch (the wiring until the first)."""
    return measured_phases(state) or state.phases


def busy(state: State) -> bool:
    """The station charges, or its contactor is closed (per its latest data): no firmware
    update, LP move or forget now."""
    data = state.data
    return state.connected and data is not None and (data.contactor or charging(state))


def not_stopped(state: State) -> bool:
    """A connected station still reports a closed contactor or a current offered."""
    data = state.data
    return state.connected and data is not None and (data.contactor or data.pwm != PWM_OFF)


def pwm_not_applied(state: State, now: float) -> bool:
    """A connected station has not yet reported the PWM it should show now."""
    want, data = target(state, now), state.data
    return want is not None and data is not None and data.pwm != want.pwm


def fresh_data(state: State, now: float, max_age: float) -> StationData | None:
    """The latest data, if the station is connected, the data at most ``max_age`` old and
    plausible."""
    if not state.connected or state.data is None or state.data_at is None:
        return None
    if implausible(state.data) is not None:
        return None
    return state.data if now - state.data_at <= max_age else None


def next_deadline(state: State) -> float | None:
    """When the decisions change by time alone (stop timeout, end of a pause or hold)."""
    times = []
    if state.stop_since is not None:
        times.append(state.stop_since + state.config.stop_timeout)
    if state.sequence is not None and state.sequence.until is not None:
        times.append(state.sequence.until)
    if state.closed_not_before is not None:
        times.append(state.closed_not_before)
    return min(times, default=None)


def settle(state: State, now: float) -> State:
    """Apply what follows from the state and the time: stop timer, sequence stages."""
    data = state.data
    stopping_under_load = (
        state.connected
        and data is not None
        and data.contactor
        and data.pilot.requests_power
        and (offered_pwm(state) == PWM_OFF or not state.contactor_allowed)
    )
    stop_since = None
    if stopping_under_load:  # "is None", not "or": a stop that began at t = 0.0 has begun
        stop_since = now if state.stop_since is None else state.stop_since
    closed_not_before = state.closed_not_before
    if closed_not_before is not None and now >= closed_not_before:
        closed_not_before = None
    state = replace(state, stop_since=stop_since, closed_not_before=closed_not_before)

    seq = state.sequence
    if seq is None:
        return state
    fresh = state.reports > seq.after_report
    if seq.stage is Stage.STOPPING and state.connected and fresh and data and not data.contactor:
        if seq.phases is not None:
            return replace(state, sequence=replace(seq, stage=Stage.READY))
        assert seq.seconds is not None
        hold = replace(seq, stage=Stage.HOLD, until=now + seq.seconds, plugged=data.pilot.plugged)
        return replace(state, sequence=hold)
    if seq.stage in (Stage.HOLD, Stage.PAUSE) and seq.until is not None and now >= seq.until:
        phases = seq.phases if seq.phases is not None else state.phases
        resume = seq.plugged if seq.stage is Stage.HOLD else None
        return settle(replace(state, sequence=None, phases=phases, resume_plugged=resume), now)
    return state


# --- events ----------------------------------------------------------------------------------


def observe(state: State, data: StationData, now: float) -> State:
    """The station reported its state."""
    closed_not_before = state.closed_not_before
    opened = state.data is not None and state.data.contactor and not data.contactor
    if opened and state.config.contactor_min_off > 0:
        # Counted from the report, which comes after the real opening: the contactor rests at
        # least this long.
        closed_not_before = now + state.config.contactor_min_off
    return settle(
        replace(
            state,
            data=data,
            data_at=now,
            reports=state.reports + 1,
            connected=True,
            supply_exposure_ca=supply_exposure_after_report(state),
            closed_not_before=closed_not_before,
            resume_plugged=state.resume_plugged if data.pwm == PWM_STATE_F else None,
        ),
        now,
    )


def restore(
    state: State, data: StationData, data_at: float, closed_not_before: float | None
) -> State:
    """After a restart: the station's last report (from ``data_at``, in the past) and the
    contactor's rest, as they were kept. The station is not connected: nothing is commanded
    from this, but its last plug state is shown and its last PWM counted as possibly offered
    until its own safety timeout."""
    return replace(state, data=data, data_at=data_at, closed_not_before=closed_not_before)


def disconnect(state: State, now: float) -> State:
    """The station's session ended; its last data stays for display only."""
    return settle(replace(state, connected=False), now)


def tick(state: State, now: float) -> State:
    """Time passed."""
    return settle(state, now)


def check_writer(state: State, interface: str) -> None:
    """Refuse a command from an interface that does not control this charge point."""
    if interface != state.config.controller:
        raise Refused(
            RefusalKind.NOT_CONTROLLER,
            f"this charge point is controlled by {state.config.controller}, not {interface}",
        )


def set_current(state: State, centiamps: int, now: float) -> State:
    """The controller's current: 0 or 600..3200 centiamps (kept during sequences)."""
    if centiamps != 0 and not MIN_CURRENT_CA <= centiamps <= MAX_CURRENT_CA:
        raise Refused(RefusalKind.BAD_VALUE, f"current must be 0 or 600..3200, got {centiamps}")
    return settle(replace(state, requested_ca=centiamps), now)


def set_supply_cap(state: State, centiamps: int | None, now: float) -> State:
    """The shared supply grants this station at most ``centiamps`` (0: nothing; None: the
    supply has no limit at the moment, e.g. dimming is possible but not in effect)."""
    grant = station_max_ca(state) if centiamps is None else centiamps
    exposure = max(state.supply_exposure_ca, grant)
    return settle(replace(state, supply_cap_ca=centiamps, supply_exposure_ca=exposure), now)


def station_max_ca(state: State) -> int:
    """The most this station is ever offered (its configured max_current)."""
    return round(state.config.max_current_a * 100)


def supply_exposure_after_report(state: State) -> int:
    """What a report leaves possibly offered beyond its PWM: the grant in force (a command sent
    under it may still be on its way). Without a grant (no limit), anything up to the station's
    own maximum: a limit that appears later must not count on the last reported PWM alone."""
    return station_max_ca(state) if state.supply_cap_ca is None else state.supply_cap_ca


def set_contactor_allowed(state: State, allowed: bool, now: float) -> State:
    """Let the contactor close when the vehicle asks; or stop charging and keep it open."""
    return settle(replace(state, contactor_allowed=allowed), now)


def shut_down(state: State, now: float) -> State:
    """The service stops: no current, and no sequence that would hold or resume charging."""
    return settle(replace(state, requested_ca=0, sequence=None), now)


def leave_charging(state: State, now: float) -> State:
    """The service stops but leaves charging as it is. A pilot interruption ends now (the station
    would hold state F until its own timeout); a phase switch stays stopped, as its relays were
    left in an unknown position."""
    if state.sequence is None or state.sequence.seconds is None:
        return state
    return settle(replace(state, sequence=None), now)


def reassign(state: State, now: float) -> State:
    """The station is served as another LP: what its controller wrote for the old one (current,
    phase target, heartbeat enforcement, contactor permission) no longer applies."""
    start = initial_state(state.config)
    return settle(
        replace(
            state,
            requested_ca=start.requested_ca,
            contactor_allowed=start.contactor_allowed,
            enforce_heartbeat=start.enforce_heartbeat,
            phase_target=start.phase_target,
        ),
        now,
    )


def change_controller(state: State, config: ChargePointConfig, now: float) -> State:
    """Another controller drives the charge point from now on (``config`` names it): what the
    old one wrote (current, phase target, heartbeat enforcement, contactor permission) no
    longer applies; a sequence in progress runs to its end."""
    return reassign(replace(state, config=config), now)


def set_heartbeat_lapsed(state: State, lapsed: bool, now: float) -> State:
    """No controller has asked anything for the heartbeat timeout (or one came back)."""
    return settle(replace(state, heartbeat_lapsed=lapsed), now)


def set_heartbeat_enforced(state: State, enforced: bool, now: float) -> State:
    """Turn heartbeat enforcement on or off for this charge point."""
    return settle(replace(state, enforce_heartbeat=enforced), now)


def check_phase_target(state: State, phases: int) -> None:
    """Refuse a phase target this station cannot reach."""
    wired = state.config.phases
    if phases not in (1, 3):
        raise Refused(RefusalKind.BAD_VALUE, f"phase target must be 1 or 3, got {phases}")
    if phases > wired:
        raise Refused(RefusalKind.BAD_VALUE, f"station is wired for {wired} phase(s), not {phases}")
    if not state.config.can_switch_phases and phases != wired:
        raise Refused(
            RefusalKind.BAD_VALUE,
            f"station is wired for {wired} phases and has no phase_switch_command",
        )


def set_phase_target(state: State, phases: int, now: float) -> State:
    """Remember the phase target for the next trigger."""
    check_phase_target(state, phases)
    return settle(replace(state, phase_target=phases), now)


def _check_can_start_sequence(state: State, what: str) -> None:
    if state.sequence is not None:
        raise Refused(RefusalKind.BUSY, f"{what} refused: a {state.sequence.kind} is running")
    if not state.connected or state.data is None:
        raise Refused(RefusalKind.OFFLINE, f"{what} refused: the station is not connected")


def trigger_phase_switch(state: State, now: float) -> State:
    """Start the phase switch to the target; a no-op when the target is already in use.

    "In use" is what the station really uses (:func:`phases_in_use`): a vehicle that draws on
    one phase while three were switched last (a relay that did not follow, a restart) gets the
    switch it asks for, instead of a no-op that would leave it there. After a failed switch
    every trigger runs the command again, whatever the target. A trigger for the switch that
    is already running is that same command again: accepted, nothing changes.
    """
    phases = state.phase_target if state.phase_target is not None else state.phases
    seq = state.sequence
    if seq is not None and seq.phases == phases:
        return state
    if seq is None and phases == phases_in_use(state) and not state.switch_failed:
        return settle(replace(state, phases=phases), now)
    _check_can_start_sequence(state, "phase switch")
    seq = Sequence(stage=Stage.STOPPING, phases=phases, after_report=state.reports)
    return settle(replace(state, sequence=seq, switch_failed=False), now)


def phase_switch_started(state: State, now: float) -> State:
    """The external phase-switch command has been started."""
    seq = state.sequence
    if seq is None or seq.stage is not Stage.READY:
        raise ValueError(f"no phase switch is ready to run (sequence {seq})")
    return settle(replace(state, sequence=replace(seq, stage=Stage.SWITCHING)), now)


def phase_switch_finished(state: State, ok: bool, now: float) -> State:
    """The command ended: pause then resume, or stay stopped if it failed."""
    seq = state.sequence
    if seq is None or seq.stage is not Stage.SWITCHING:
        raise ValueError(f"no phase switch is running (sequence {seq})")
    if not ok:
        return settle(replace(state, sequence=None, switch_failed=True), now)
    pause = replace(seq, stage=Stage.PAUSE, until=now + state.config.phase_switch_pause)
    return settle(replace(state, sequence=pause), now)


def start_cp_interruption(state: State, seconds: int, now: float) -> State:
    """Stop safely, hold the pilot at state F for ``seconds``, then resume."""
    if not 1 <= seconds <= CP_INTERRUPTION_MAX_S:
        raise Refused(RefusalKind.BAD_VALUE, f"interruption must be 1..60 s, got {seconds}")
    _check_can_start_sequence(state, "pilot interruption")
    seq = Sequence(stage=Stage.STOPPING, seconds=seconds, after_report=state.reports)
    return settle(replace(state, sequence=seq), now)


def describe_changes(old: State, new: State) -> list[str]:
    """What a controller's command changed, for the log."""
    changes = []
    if new.requested_ca != old.requested_ca:
        changes.append(f"charging current set to {new.requested_ca / 100:.2f} A")
    if new.enforce_heartbeat != old.enforce_heartbeat:
        changes.append(f"heartbeat enforcement {'on' if new.enforce_heartbeat else 'off'}")
    if new.sequence is not None and new.sequence != old.sequence:
        seq = new.sequence
        what = (
            f"phase switch to {seq.phases} phase(s)"
            if seq.phases is not None
            else f"control-pilot interruption for {seq.seconds} s"
        )
        changes.append(f"{what} started")
    return changes


# --- the live charge point -------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a charge point is: its station, its LP number and how it is shown."""

    serial: str  # the station's 32-hex-digit ID
    lp: int | None  # None: all nine LPs are taken; the station is kept safe but not served
    name: str
    serial_number: str  # what the serial_number register shows
    # What names the station where anyone may read it (MQTT topics): not the ID, which is its
    # only credential (identity.py); "" where nobody reads it.
    public_id: str = ""


class ChargePoint:
    """The live state of one charge point; every change goes through the pure functions above.

    It is also what the station's session asks (observe, tick, target, ...). ``on_change`` is
    called after every change so the session can act on it at once.
    """

    def __init__(
        self,
        identity: Identity,
        config: ChargePointConfig,
        *,
        energy_wh: float = 0.0,
        max_data_age: float = 15.0,
    ) -> None:
        self.identity = identity
        self.state = initial_state(config)
        max_power_w = config.max_current_a * config.phases * MAX_PLAUSIBLE_MV / 1000
        self.energy = EnergyMeter(wh=energy_wh, max_power_w=max_power_w)
        # Data older than this counts as none, and energy is not integrated across such a gap.
        self.max_data_age = max_data_age
        self.on_change: Callable[[], None] = lambda: None
        self.implausible_reports = 0
        self._implausible_log = RateLimit(per_second=1 / 60, burst=3, kind="implausible_report")
        #: The last log lines the station sent (escaped and shortened by the link).
        self.recent_log: deque[str] = deque(maxlen=RECENT_LOG_LINES)
        #: When (monotonic) and why the station's last session ended (None: not yet).
        self.last_disconnect: tuple[float, str] | None = None
        #: The energy counter when the vehicle was plugged in (None: no vehicle seen plugged).
        self.plugged_at_wh: float | None = None

    @property
    def name(self) -> str:
        """How the charge point is called in logs and metrics."""
        return self.identity.name

    @property
    def energy_wh(self) -> float:
        """The energy counter (Wh)."""
        return self.energy.wh

    def commit(self, state: State) -> None:
        """Make ``state`` (derived from the current one by the functions above) the current one."""
        if state != self.state:
            self.state = state
            self.on_change()

    def observe(self, data: StationData, now: float) -> None:
        """New data from the station; counts energy since the previous data."""
        self.recent_log.extend(data.log_lines)
        problem = implausible(data)
        if problem is None:
            self.energy.sample(data.power_w, data.contactor, now, self.max_data_age)
        else:
            self.implausible_reports += 1
            self.energy.interrupt()  # the gap around a bad report is skipped, not bridged
            if self._implausible_log.allow(now):
                dropped = self._implausible_log.take_dropped()
                more = f" ({dropped} more since the last such line)" if dropped else ""
                log.warning(
                    "station %s: implausible report ignored, treated as a fault: %s%s",
                    self.name,
                    problem,
                    more,
                )
        self.commit(observe(self.state, data, now))
        # Only state A ends a vehicle's session: a fault or a pilot interruption hides it.
        if data.pilot is Pilot.A_12V and problem is None:
            self.plugged_at_wh = None
        elif data.pilot.plugged and self.plugged_at_wh is None:
            self.plugged_at_wh = self.energy.wh

    @property
    def session_wh(self) -> float | None:
        """Energy since the vehicle was plugged in (None: no vehicle)."""
        return None if self.plugged_at_wh is None else self.energy.wh - self.plugged_at_wh

    def disconnected(self, now: float, reason: str) -> None:
        """The station's session ended."""
        self.last_disconnect = (now, reason)
        self.energy.interrupt()
        self.commit(disconnect(self.state, now))

    def tick(self, now: float) -> None:
        """Time passed."""
        self.commit(tick(self.state, now))

    def target(self, now: float) -> Target | None:
        """What the station should do now."""
        return target(self.state, now)

    def next_deadline(self) -> float | None:
        """When to call :meth:`tick` at the latest."""
        return next_deadline(self.state)
