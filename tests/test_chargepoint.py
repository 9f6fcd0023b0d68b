"""The charging-control state machine with a fake clock, and its safety rules under hypothesis."""

from dataclasses import replace

import pytest
from conftest import idle_data
from hypothesis import given, settings
from hypothesis import strategies as st

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.evse.protocol import Pilot, Proximity

CFG = cp.ChargePointConfig(stop_timeout=6.0, phase_switch_pause=5.0)


def connected(config=CFG, now=0.0, **data) -> cp.State:
    return cp.observe(cp.initial_state(config), idle_data(**data), now)


def charging_state(now=0.0, amps=16) -> cp.State:
    """A vehicle charging at ``amps`` with everything confirmed by the station."""
    s = cp.set_current(connected(pilot=Pilot.B_9V, now=now), amps * 100, now)
    pwm = cp.offered_pwm(s)
    return cp.observe(
        s,
        idle_data(pilot=Pilot.C_6V, pwm=pwm, contactor=True, currents_ma=(15_600,) * 3),
        now,
    )


# --- current -> PWM ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amps_x100", "proximity", "cable", "max_a", "pwm"),
    [
        (1600, Proximity.CABLE_32A, "socket", 32, 26),  # 16 A -> 26 % = 15.6 A, never more
        (600, Proximity.CABLE_32A, "socket", 32, 10),
        (3200, Proximity.CABLE_32A, "socket", 32, 53),
        (3200, Proximity.CABLE_13A, "socket", 32, 21),  # a 13 A cable caps at 12.6 A
        (3200, Proximity.CABLE_20A, "socket", 32, 33),
        (3200, Proximity.CABLE_32A, "socket", 10, 16),  # station limit 10 A
        (3200, Proximity.NO_CABLE, "socket", 32, 100),  # socket without a cable: nothing
        (3200, Proximity.NO_CABLE, "tethered", 16, 26),  # fixed cable: the station limit
        (3200, Proximity.UNKNOWN, "tethered", 32, 100),  # unknown reading: nothing
        (0, Proximity.CABLE_32A, "socket", 32, 100),
        (1625, Proximity.CABLE_32A, "socket", 32, 27),  # evcc writes fractional amps
    ],
)
def test_offered_pwm(amps_x100, proximity, cable, max_a, pwm):
    config = replace(CFG, cable=cable, max_current_a=max_a)
    s = cp.set_current(connected(config, proximity=proximity), amps_x100, 0)
    assert cp.offered_pwm(s) == pwm


@pytest.mark.parametrize(
    ("pwm", "amps"),
    [(0, 0), (5, 0), (10, 6.0), (26, 15.6), (53, 31.8), (85, 51.0), (90, 65.0), (97, 0), (100, 0)],
)
def test_offered_amps_follows_iec_61851(pwm, amps):
    assert cp.offered_amps(pwm) == pytest.approx(amps)


# --- the charging sequence -----------------------------------------------------------------


def test_no_vehicle_no_current_and_open_contactor():
    s = cp.set_current(connected(), 1600, 0)
    assert cp.target(s, 0) == cp.Target(100, False)


def test_plugged_vehicle_is_offered_the_current_and_the_contactor_follows_its_request():
    s = cp.set_current(connected(pilot=Pilot.B_9V), 1600, 0)
    assert cp.target(s, 0) == cp.Target(26, False)
    s = cp.observe(s, idle_data(pilot=Pilot.C_6V, pwm=26), 1)
    assert cp.target(s, 1) == cp.Target(26, True)
    s = cp.observe(s, idle_data(pilot=Pilot.D_3V, pwm=26, contactor=True), 2)
    assert cp.target(s, 2) == cp.Target(26, True) and cp.charging(s)


def test_vehicle_asking_without_an_offered_current_gets_no_contactor():
    s = connected(pilot=Pilot.C_6V)  # requested current 0
    assert cp.target(s, 0) == cp.Target(100, False)


def test_stop_sets_pwm_100_first_and_waits_for_the_vehicle():
    s = cp.set_current(charging_state(), 0, 10)
    assert cp.target(s, 10) == cp.Target(100, True)  # PWM first, contactor stays
    assert s.requested_ca == 0 and s.stop_since == 10
    # the station confirms PWM 100 but the vehicle still draws: keep waiting
    s = cp.observe(s, replace(s.data, pwm=100), 11)
    assert cp.target(s, 11) == cp.Target(100, True)
    # the vehicle has stopped drawing: open
    s = cp.observe(s, replace(s.data, currents_ma=(200, 150, 100)), 12)
    assert cp.target(s, 12) == cp.Target(100, False)


def test_stop_opens_when_the_vehicle_goes_back_to_b():
    s = cp.set_current(charging_state(), 0, 10)
    s = cp.observe(s, replace(s.data, pwm=100, pilot=Pilot.B_9V), 11)
    assert cp.target(s, 11) == cp.Target(100, False)


def test_stop_opens_after_the_time_limit_even_under_load():
    s = cp.set_current(charging_state(), 0, 10)
    s = cp.observe(s, replace(s.data, pwm=100), 11)
    assert cp.next_deadline(s) == 16
    assert cp.target(cp.tick(s, 15.9), 15.9) == cp.Target(100, True)
    assert cp.target(cp.tick(s, 16), 16) == cp.Target(100, False)


def test_stop_timeout_counts_from_a_stop_that_began_at_time_zero():
    s = cp.set_current(charging_state(now=0.0), 0, 0.0)
    assert s.stop_since == 0.0
    s = cp.observe(s, replace(s.data, pwm=100), 1.0)  # still drawing
    assert s.stop_since == 0.0 and cp.next_deadline(s) == 6.0
    assert cp.target(cp.tick(s, 5.9), 5.9) == cp.Target(100, True)
    assert cp.target(cp.tick(s, 6.0), 6.0) == cp.Target(100, False)


def test_stop_never_opens_before_the_station_reports_pwm_100():
    s = cp.set_current(charging_state(), 0, 10)
    s = cp.observe(s, replace(s.data, currents_ma=(0, 0, 0)), 30)  # still PWM 26 reported
    assert cp.target(s, 30) == cp.Target(100, True)


@pytest.mark.parametrize("pilot", [Pilot.A_12V, Pilot.FAULT, Pilot.MINUS_12V, Pilot.UNKNOWN])
def test_unplug_or_fault_opens_at_once(pilot):
    s = charging_state()
    s = cp.observe(s, replace(s.data, pilot=pilot), 1)
    assert cp.target(s, 1) == cp.Target(100, False)


def test_current_change_while_charging_changes_only_the_pwm():
    s = cp.set_current(charging_state(), 1000, 5)
    assert cp.target(s, 5) == cp.Target(16, True)


# --- a controller that switches the contactor (bridge-mqtt) ---------------------------------

BY_REQUEST = replace(CFG, contactor_by_request=True)


def test_contactor_by_request_stays_open_until_allowed_while_the_current_is_offered():
    s = cp.set_current(connected(BY_REQUEST, pilot=Pilot.B_9V), 1600, 0)
    assert not s.contactor_allowed
    assert cp.target(s, 0) == cp.Target(26, False)
    s = cp.observe(s, idle_data(pilot=Pilot.C_6V, pwm=26), 1)
    assert cp.target(s, 1) == cp.Target(26, False)  # the vehicle asks; not allowed yet
    s = cp.set_contactor_allowed(s, True, 2)
    assert cp.target(s, 2) == cp.Target(26, True)


def test_contactor_allowed_does_not_close_without_a_vehicle_request_or_a_current():
    s = cp.set_contactor_allowed(connected(BY_REQUEST, pilot=Pilot.B_9V), True, 0)
    assert cp.target(s, 0) == cp.Target(100, False)  # no current requested
    s = cp.set_current(s, 1600, 1)
    assert cp.target(s, 1) == cp.Target(26, False)  # the vehicle does not ask yet


def test_contactor_no_longer_allowed_stops_the_safe_way_then_offers_the_current_again():
    s = cp.set_contactor_allowed(charging_state(), False, 10)
    assert cp.target(s, 10) == cp.Target(100, True)  # PWM 100 % first, contactor stays
    assert s.stop_since == 10 and s.requested_ca == 1600
    s = cp.observe(s, replace(s.data, pwm=100), 11)
    assert cp.target(s, 11) == cp.Target(100, True)  # the vehicle still draws
    assert cp.target(cp.tick(s, 16), 16) == cp.Target(100, False)  # stop_timeout
    s = cp.observe(s, replace(s.data, pwm=100, pilot=Pilot.B_9V, currents_ma=(0, 0, 0)), 12)
    assert cp.target(s, 12) == cp.Target(100, False)  # the vehicle stopped: open
    s = cp.observe(s, replace(s.data, contactor=False), 13)
    assert cp.target(s, 13) == cp.Target(26, False)  # offered again, contactor stays open
    s = cp.observe(s, replace(s.data, pwm=26, pilot=Pilot.C_6V), 14)
    assert cp.target(s, 14) == cp.Target(26, False)
    s = cp.set_contactor_allowed(s, True, 15)
    assert cp.target(s, 15) == cp.Target(26, True)


def holding_state_f() -> cp.State:
    """A 16 A charge that stopped for a 30 s pilot interruption and now holds state F (t = 1)."""
    s = cp.start_cp_interruption(charging_state(), 30, 0)
    s = cp.observe(s, replace(s.data, pwm=100, pilot=Pilot.B_9V, contactor=False), 1)
    assert cp.target(s, 1) == cp.Target(cp.PWM_STATE_F, False)
    return s


def test_shutdown_stops_the_normal_way_and_ends_a_pilot_interruption():
    s = cp.shut_down(holding_state_f(), 2)
    assert s.sequence is None and s.requested_ca == 0
    assert cp.target(s, 2) == cp.Target(100, False)
    s = cp.shut_down(charging_state(), 3)
    assert cp.target(s, 3) == cp.Target(100, True)  # PWM first, as for any stop


def test_leaving_charging_on_shutdown_ends_only_a_pilot_interruption():
    s = cp.leave_charging(holding_state_f(), 2)
    assert s.sequence is None and s.requested_ca == 1600
    assert cp.target(s, 2) == cp.Target(26, False)  # offered again; closes once the PWM is seen
    switchable = replace(charging_state(), config=SWITCHABLE)
    switching = cp.trigger_phase_switch(cp.set_phase_target(switchable, 1, 0), 0)
    assert switching.sequence is not None
    assert cp.leave_charging(switching, 1) == switching
    assert cp.leave_charging(charging_state(), 1) == charging_state()


def test_disconnected_station_gets_no_commands():
    s = cp.disconnect(charging_state(), 1)
    assert cp.target(s, 1) is None
    assert s.requested_ca == 1600  # kept for the reconnect


# --- heartbeat -----------------------------------------------------------------------------


def test_heartbeat_lapse_stops_and_recovery_resumes_with_the_kept_current():
    s = cp.set_heartbeat_lapsed(charging_state(), True, 80)
    assert cp.allowed_ca(s) == 0 and s.requested_ca == 1600
    assert cp.target(s, 80) == cp.Target(100, True)  # the normal safe stop
    s = cp.set_heartbeat_lapsed(s, False, 90)
    assert cp.target(s, 90) == cp.Target(26, True)


def test_heartbeat_enforcement_off_ignores_lapses():
    s = cp.set_heartbeat_enforced(charging_state(), False, 0)
    s = cp.set_heartbeat_lapsed(s, True, 80)
    assert cp.target(s, 80) == cp.Target(26, True)
    s = cp.set_heartbeat_enforced(s, True, 81)
    assert cp.target(s, 81).pwm == 100


# --- phase switch --------------------------------------------------------------------------

SWITCHABLE = replace(CFG, can_switch_phases=True)


def test_phase_target_without_a_switch_command():
    s = connected()
    assert cp.set_phase_target(s, 3, 0).phase_target == 3  # equal to the wiring: fine
    with pytest.raises(cp.Refused, match="no phase_switch_command") as err:
        cp.set_phase_target(s, 1, 0)
    assert err.value.kind is cp.RefusalKind.BAD_VALUE
    assert cp.trigger_phase_switch(cp.set_phase_target(s, 3, 0), 0).sequence is None  # no-op


def test_phase_target_beyond_the_wiring_is_refused():
    s = connected(replace(SWITCHABLE, phases=1))
    with pytest.raises(cp.Refused, match="wired for 1"):
        cp.set_phase_target(s, 3, 0)


def test_phase_switch_sequence_step_by_step():
    s = replace(charging_state(), config=SWITCHABLE)
    s = cp.set_phase_target(s, 1, 0)
    s = cp.trigger_phase_switch(s, 0)
    assert s.sequence.stage is cp.Stage.STOPPING
    assert cp.target(s, 0) == cp.Target(100, True)  # stops the normal way
    s = cp.set_current(s, 1000, 0.5)  # arrives during the sequence: kept for later
    s = cp.observe(s, replace(s.data, pwm=100, currents_ma=(0, 0, 0)), 1)
    assert cp.target(s, 1) == cp.Target(100, False)
    s = cp.observe(s, replace(s.data, contactor=False, pilot=Pilot.B_9V), 2)
    assert s.sequence.stage is cp.Stage.READY
    s = cp.phase_switch_started(s, 2)
    assert s.sequence.stage is cp.Stage.SWITCHING and cp.target(s, 2) == cp.Target(100, False)
    s = cp.phase_switch_finished(s, True, 3)
    assert s.sequence.stage is cp.Stage.PAUSE and cp.next_deadline(s) == 8
    assert cp.target(cp.tick(s, 7.9), 7.9) == cp.Target(100, False)
    s = cp.tick(s, 8)
    assert s.sequence is None and s.phases == 1
    assert cp.target(s, 8) == cp.Target(16, False)  # 10 A, the current written meanwhile


def test_failed_phase_switch_leaves_charging_stopped_until_the_next_trigger():
    s = cp.set_current(connected(SWITCHABLE, pilot=Pilot.B_9V), 1600, 0)
    s = cp.trigger_phase_switch(cp.set_phase_target(s, 1, 0), 0)
    assert s.sequence.stage is cp.Stage.STOPPING  # until a report after the trigger
    s = cp.observe(s, s.data, 0.1)
    assert s.sequence.stage is cp.Stage.READY  # nothing was charging
    s = cp.phase_switch_finished(cp.phase_switch_started(s, 0), False, 1)
    assert s.switch_failed and s.sequence is None and s.phases == 3
    assert cp.target(s, 100) == cp.Target(100, False)
    s = cp.observe(cp.trigger_phase_switch(s, 101), s.data, 101)  # the controller tries again
    assert s.sequence.stage is cp.Stage.READY and not s.switch_failed


def test_second_trigger_during_a_sequence_is_busy_and_offline_station_is_refused():
    s = cp.trigger_phase_switch(cp.set_phase_target(connected(SWITCHABLE), 1, 0), 0)
    with pytest.raises(cp.Refused) as err:
        cp.start_cp_interruption(s, 5, 0)
    assert err.value.kind is cp.RefusalKind.BUSY
    offline = cp.disconnect(cp.set_phase_target(connected(SWITCHABLE), 1, 0), 0)
    with pytest.raises(cp.Refused) as err:
        cp.trigger_phase_switch(offline, 0)
    assert err.value.kind is cp.RefusalKind.OFFLINE


# --- control-pilot interruption -------------------------------------------------------------


def test_cp_interruption_step_by_step():
    s = cp.start_cp_interruption(charging_state(), 3, 0)
    assert cp.target(s, 0) == cp.Target(100, True)  # safe stop first
    s = cp.observe(s, replace(s.data, pwm=100, pilot=Pilot.B_9V), 1)
    assert cp.target(s, 1) == cp.Target(100, False)
    s = cp.observe(s, replace(s.data, contactor=False), 2)
    assert s.sequence.stage is cp.Stage.HOLD
    assert cp.target(s, 2) == cp.Target(0, False)  # state F
    s = cp.observe(s, replace(s.data, pwm=0, pilot=Pilot.FAULT), 3)  # our own F, not a fault
    assert cp.target(s, 4.9) == cp.Target(0, False)
    s = cp.tick(s, 5)
    assert s.sequence is None
    s = cp.observe(s, replace(s.data, pwm=0, pilot=Pilot.B_9V), 5.1)
    assert cp.target(s, 5.1) == cp.Target(26, False)  # offered again; the vehicle wakes up


@pytest.mark.parametrize("seconds", [0, 61, -1])
def test_cp_interruption_bounds(seconds):
    with pytest.raises(cp.Refused) as err:
        cp.start_cp_interruption(connected(), seconds, 0)
    assert err.value.kind is cp.RefusalKind.BAD_VALUE


@pytest.mark.parametrize("value", [1, 599, 3201, -600])
def test_current_bounds(value):
    with pytest.raises(cp.Refused):
        cp.set_current(connected(), value, 0)


# --- plausibility ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("volts_mv", "amps_ma", "problem"),
    [
        ((230_000, 300_001, 230_000), (0, 0, 0), "phase 2 voltage 300.001 V is above 300 V"),
        ((230_000,) * 3, (0, 0, 2**32 - 1), "phase 3 current 4.29497e+06 A is above 64 A"),
        ((300_000,) * 3, (64_000,) * 3, None),
    ],
)
def test_implausible_measurements(volts_mv, amps_ma, problem):
    assert cp.implausible(idle_data(voltages_mv=volts_mv, currents_ma=amps_ma)) == problem


def test_an_implausible_report_is_a_fault_even_while_charging():
    s = charging_state()
    bad = idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True, currents_ma=(99_000, 0, 0))
    s = cp.observe(s, bad, 1.0)
    assert cp.target(s, 1.0) == cp.Target(cp.PWM_OFF, False)
    assert cp.fresh_data(s, 1.0, 15) is None  # served as "no data"


def test_implausible_reports_are_counted_not_integrated_and_logged_rate_limited(caplog):
    point = cp.ChargePoint(cp.Identity("S", 1, "LP1", "S"), CFG)
    bad = idle_data(contactor=True, voltages_mv=(2**32 - 1,) * 3, currents_ma=(2**32 - 1,) * 3)
    for t in range(100):
        point.observe(bad, float(t))
    assert point.energy.wh == 0
    assert point.implausible_reports == 100
    warnings = [r.getMessage() for r in caplog.records if "implausible" in r.getMessage()]
    assert len(warnings) == 4  # a burst of 3, then one a minute saying how many it left out
    assert "(57 more since the last such line)" in warnings[3]


def test_energy_never_counts_more_than_the_station_can_deliver():
    config = replace(CFG, max_current_a=16.0, phases=3)
    point = cp.ChargePoint(cp.Identity("S", 1, "LP1", "S"), config)
    high = idle_data(contactor=True, voltages_mv=(299_000,) * 3, currents_ma=(63_000,) * 3)
    for t in range(11):  # plausible readings each, but 56.5 kW through a 16 A station
        point.observe(high, float(t))
    assert point.energy.wh == pytest.approx(16 * 3 * 300 * 10 / 3600)


def test_the_last_station_log_lines_are_kept_bounded():
    point = cp.ChargePoint(cp.Identity("S", 1, "LP1", "S"), CFG)
    point.observe(idle_data(log_lines=tuple(f"l{i}" for i in range(50))), 0.0)
    assert list(point.recent_log) == [f"l{i}" for i in range(30, 50)]


# --- safety properties over random histories -----------------------------------------------

events = st.one_of(
    st.tuples(st.just("current"), st.sampled_from([0, 600, 1000, 1600, 2000, 3200])),
    st.tuples(st.just("pilot"), st.sampled_from(list(Pilot))),
    st.tuples(st.just("draw"), st.sampled_from([0, 500, 8000, 16000, 32000])),
    st.tuples(st.just("proximity"), st.sampled_from(list(Proximity))),
    st.tuples(st.just("lapse"), st.booleans()),
    st.tuples(st.just("enforce"), st.booleans()),
    st.tuples(st.just("wait"), st.floats(0.05, 8)),
    st.tuples(st.just("link"), st.booleans()),
    st.tuples(st.just("interrupt"), st.integers(1, 5)),
    st.tuples(st.just("phases"), st.sampled_from([1, 3])),
    st.tuples(st.just("switch_done"), st.booleans()),
    st.tuples(st.just("pwm_stuck"), st.booleans()),  # the station acks PWM but ignores it
    st.tuples(st.just("poll"), st.none()),
    st.tuples(st.just("poll"), st.none()),
    st.tuples(st.just("shutdown"), st.none()),
    st.tuples(st.just("contactor"), st.booleans()),
)


# The cable rating the proximity pilot shows, in centiamps (the IEC 61851 coding resistors).
CABLE_CA = {Proximity.CABLE_13A: 1300, Proximity.CABLE_20A: 2000, Proximity.CABLE_32A: 3200}


class Station:
    """The station and vehicle under the charge point, applying commands like the link does.

    It also keeps its own record of what happened (requests, heartbeat, sequences, reports),
    from which it knows, without asking the code under test, the most that may be offered.
    """

    def __init__(self, config: cp.ChargePointConfig) -> None:
        self.pwm, self.contactor = 100, False
        self.pilot, self.draw_ma, self.proximity = Pilot.A_12V, 0, Proximity.CABLE_32A
        self.connected = True
        self.pwm_stuck = False
        self.unconfirmed = False  # commands sent, their confirming report not yet received
        self.opened_at: float | None = None  # when the contactor last opened
        self.state = cp.initial_state(config)
        self.now = 0.0
        self.config = config
        # the independent record
        self.requested_ca = 0
        self.lapsed, self.enforced = False, True
        self.switch_running = False  # a phase switch until its command succeeded
        self.switch_failed = False  # its command failed: nothing until the next switch
        self.blocked_until = -1.0  # an interruption's hold or a switch's pause: nothing before
        self.interrupting = False  # an interruption was asked for and has not ended yet
        self.reported = None  # the last data the station reported
        self.stop_began: float | None = None  # PWM 100 commanded while charging under load

    def data(self):
        currents = (self.draw_ma,) * 3 if self.contactor else (0, 0, 0)
        return idle_data(
            pwm=self.pwm,
            contactor=self.contactor,
            pilot=self.pilot,
            proximity=self.proximity,
            currents_ma=currents,
        )

    def may_offer_ca(self) -> int:
        """The most that may be offered now, from the record alone (0: nothing)."""
        if self.lapsed and self.enforced:
            return 0
        if self.switch_running or self.switch_failed or self.now < self.blocked_until:
            return 0
        proximity = self.reported.proximity if self.reported else Proximity.UNKNOWN
        cable = CABLE_CA.get(proximity, 0)
        if proximity is Proximity.NO_CABLE and self.config.cable == "tethered":
            cable = 3200  # a fixed cable without a coding resistor: the station limit applies
        return min(self.requested_ca, cable, round(self.config.max_current_a * 100))

    def settled(self) -> None:
        """Check the decision after every event; record when a stop under load began."""
        if self.state.sequence is None:
            self.interrupting = False
        data = self.state.data
        want = cp.target(self.state, self.now)
        stopping = (
            self.connected
            and data is not None
            and data.contactor
            and data.pilot.requests_power
            and want is not None
            and want.pwm == 100
        )
        if want is not None and 10 <= want.pwm <= 85:  # the decision, before any command
            assert want.pwm * cp.CA_PER_PWM_PERCENT <= self.may_offer_ca(), "may not offer that"
        if not stopping:
            self.stop_began = None
        elif self.stop_began is None:
            self.stop_began = self.now

    def reconcile(self) -> None:
        """One round of the link: send what differs from the last report. Like the link, no
        new round before the report that follows the commands; events can come in between."""
        self.settled()
        if not self.connected or self.unconfirmed:
            return
        want = cp.target(self.state, self.now)
        if want is None:
            return
        data = self.state.data
        if want.pwm != data.pwm:
            self.check_pwm(want.pwm)
            if not self.pwm_stuck:
                self.pwm = want.pwm
            self.unconfirmed = True
        if want.contactor != data.contactor:
            self.check_contactor(want.contactor)
            if self.contactor and not want.contactor:
                self.opened_at = self.now
            self.contactor = want.contactor
            self.unconfirmed = True

    def poll(self) -> None:
        """A report, and the round the link does after it."""
        if not self.connected:
            return
        self.report()
        self.reconcile()
        holding = self.state.sequence and self.state.sequence.stage is cp.Stage.HOLD
        if (self.pilot is Pilot.A_12V or self.pilot.is_fault) and not holding:
            self.report()
            self.reconcile()
            assert not self.contactor, "contactor left closed after unplug or fault"
            holding = self.state.sequence and self.state.sequence.stage is cp.Stage.HOLD
            if not holding:  # an interruption may hold state F even with nothing plugged in
                assert self.pwm == 100 or self.pwm_stuck, "PWM left on after unplug or fault"

    def report(self) -> None:
        self.reported = self.data()
        self.state = cp.observe(self.state, self.reported, self.now)
        self.unconfirmed = False

    def check_pwm(self, pwm: int) -> None:
        if 10 <= pwm <= 85:
            offered_ca = pwm * cp.CA_PER_PWM_PERCENT
            assert offered_ca <= self.may_offer_ca(), "more than may be offered"
            assert offered_ca <= self.config.max_current_a * 100, "more than the station limit"
        elif pwm == 0:
            assert self.interrupting, "state F outside an interruption"
        else:
            assert pwm == 100
        if pwm == 0:
            assert not self.contactor, "state F with the contactor closed"

    def check_contactor(self, close: bool) -> None:
        pilot = self.pilot
        if close:
            # The vehicle may change its mind after its last report; the decision can only
            # rest on that report, and on a PWM the station really applied.
            assert self.state.data.pilot.requests_power, "closed without a vehicle request"
            assert self.state.contactor_allowed, "closed although the controller forbids it"
            assert 10 <= self.pwm <= 85, "closed without an offered current"
            if self.opened_at is not None and not self.contactor:
                rested = self.now - self.opened_at
                assert rested >= self.config.contactor_min_off - 1e-9, "closed within min_off"
            return
        under_load = pilot.requests_power and self.draw_ma >= cp.STOPPED_MA
        if under_load:
            # Opening under load only after PWM 100 %, seen in the station's own report.
            assert self.pwm == 100 and self.state.data.pwm == 100, "opened under load"
        reported = self.state.data
        if reported.pilot.requests_power and max(reported.currents_ma) >= cp.STOPPED_MA:
            # The vehicle still draws, by its last report: only once the stop timeout is over.
            assert self.stop_began is not None, "opened under load without a stop"
            waited = self.now - self.stop_began
            assert waited >= self.config.stop_timeout, f"opened under load after {waited} s"

    def apply(self, kind: str, value) -> None:
        s = self.state
        try:
            if kind == "current":
                s = cp.set_current(s, value, self.now)
                self.requested_ca = value
            elif kind == "pilot":
                self.pilot = value
            elif kind == "draw":
                self.draw_ma = value
            elif kind == "proximity":
                self.proximity = value
            elif kind == "pwm_stuck":
                self.pwm_stuck = value
            elif kind == "poll":
                self.poll()
                s = self.state
            elif kind == "contactor":
                s = cp.set_contactor_allowed(s, value, self.now)
            elif kind == "shutdown":
                s = cp.shut_down(s, self.now)
                self.requested_ca = 0
                self.switch_running, self.blocked_until = False, -1.0  # sequences end
            elif kind == "lapse":
                s = cp.set_heartbeat_lapsed(s, value, self.now)
                self.lapsed = value
            elif kind == "enforce":
                s = cp.set_heartbeat_enforced(s, value, self.now)
                self.enforced = value
            elif kind == "wait":
                self.now += value
                s = cp.tick(s, self.now)
            elif kind == "link" and value != self.connected:
                # Like the link: a new session starts with a collect-data, before any command;
                # commands sent before the drop are confirmed by that first report.
                self.connected = value
                self.unconfirmed = False
                if value:
                    self.poll()
                s = self.state if value else cp.disconnect(s, self.now)
            elif kind == "interrupt":
                s = cp.start_cp_interruption(s, value, self.now)
                self.blocked_until = self.now + value  # stop first, then hold: at least this
                self.interrupting = True
            elif kind == "phases":
                before = s.sequence
                s = cp.trigger_phase_switch(cp.set_phase_target(s, value, self.now), self.now)
                if before is None and s.sequence is not None:
                    self.switch_running, self.switch_failed = True, False
            elif kind == "switch_done" and s.sequence and s.sequence.stage is cp.Stage.SWITCHING:
                s = cp.phase_switch_finished(s, value, self.now)
                self.switch_running, self.switch_failed = False, not value
                if value:
                    self.blocked_until = self.now + self.config.phase_switch_pause
        except cp.Refused:
            return  # refused commands change nothing, which the next steps check anyway
        if s.sequence and s.sequence.stage is cp.Stage.READY:  # the bridge runs the command
            s = cp.phase_switch_started(s, self.now)
        self.state = s
        self.reconcile()


@settings(max_examples=2000, deadline=None)
@given(
    config=st.builds(
        cp.ChargePointConfig,
        max_current_a=st.sampled_from([6.0, 10.0, 16.0, 32.0]),
        cable=st.sampled_from(["socket", "tethered"]),
        phases=st.sampled_from([1, 3]),
        can_switch_phases=st.booleans(),
        stop_timeout=st.sampled_from([1.0, 6.0]),
        phase_switch_pause=st.just(2.0),
        contactor_min_off=st.sampled_from([0.0, 3.0, 20.0]),
        contactor_by_request=st.booleans(),
    ),
    start=st.tuples(
        st.sampled_from(list(Pilot)),
        st.sampled_from(list(Proximity)),
        st.sampled_from([0, 600, 1600, 3200]),
        st.sampled_from([0, 16000]),
        st.booleans(),  # the station acknowledges PWM commands but ignores them
    ),
    charging_polls=st.sampled_from([0, 2]),
    history=st.lists(events, max_size=40),
)
def test_safety_rules_hold_over_random_histories(config, start, charging_polls, history):
    station = Station(config)
    station.pilot, station.proximity, current, station.draw_ma, stuck = start
    station.poll()
    station.apply("current", current)
    station.pwm_stuck = stuck
    for _ in range(charging_polls):  # two reports: a vehicle that asks is charging by then
        station.apply("poll", None)
    for kind, value in history:
        before = station.state.requested_ca
        station.apply(kind, value)
        if kind not in ("current", "shutdown"):
            assert station.state.requested_ca == before  # nothing but set_current changes it


toggles = st.one_of(
    st.tuples(st.just("current"), st.sampled_from([0, 1600])),
    st.tuples(st.just("current"), st.sampled_from([0, 1600])),
    st.tuples(st.just("pilot"), st.sampled_from([Pilot.B_9V, Pilot.C_6V])),
    st.tuples(st.just("draw"), st.sampled_from([0, 16000])),
    st.tuples(st.just("wait"), st.floats(0.05, 2)),
)


@settings(max_examples=500, deadline=None)
@given(min_off=st.sampled_from([1.0, 5.0]), history=st.lists(toggles, min_size=10, max_size=60))
def test_a_toggling_controller_never_closes_within_the_minimum_off_time(min_off, history):
    config = replace(CFG, stop_timeout=1.0, contactor_min_off=min_off)
    station = Station(config)
    station.pilot, station.proximity = Pilot.C_6V, Proximity.CABLE_32A
    station.poll()
    for kind, value in history:  # Station.check_contactor asserts the rule on every close
        station.apply(kind, value)
        station.apply("poll", None)  # the link collects data after every change


def test_a_closing_within_the_minimum_off_time_waits_and_is_not_lost():
    config = replace(CFG, stop_timeout=1.0, contactor_min_off=60.0)
    s = charging_state()
    s = cp.observe(replace(s, config=config), s.data, 0.0)
    s = cp.set_current(s, 0, 0.0)
    s = cp.observe(s, replace(s.data, pwm=100, currents_ma=(0, 0, 0)), 0.5)
    assert cp.target(s, 0.5) == cp.Target(100, False)
    s = cp.observe(s, replace(s.data, contactor=False), 1.0)  # opened, seen at t = 1
    s = cp.set_current(s, 1600, 2.0)
    s = cp.observe(s, replace(s.data, pwm=26), 2.5)
    assert cp.target(s, 2.5) == cp.Target(26, False)  # offered, but the contactor rests
    assert cp.next_deadline(s) == 61.0
    assert cp.target(cp.tick(s, 60.9), 60.9) == cp.Target(26, False)
    s = cp.tick(s, 61.0)
    assert cp.target(s, 61.0) == cp.Target(26, True)
    assert cp.next_deadline(s) is None


# --- failsafe current ------------------------------------------------------------------------


def test_a_lapsed_heartbeat_offers_the_failsafe_current_never_more_than_requested():
    config = replace(CFG, failsafe_ca=800)
    s = cp.set_current(connected(config, pilot=Pilot.C_6V), 1600, 0)
    assert cp.offered_pwm(s) == 26
    lapsed = cp.set_heartbeat_lapsed(s, True, 1)
    assert cp.allowed_ca(lapsed) == 800 and cp.offered_pwm(lapsed) == 13  # 8 A: 13 %
    low = cp.set_heartbeat_lapsed(cp.set_current(s, 600, 0), True, 1)
    assert cp.allowed_ca(low) == 600  # the controller asked for less
    paused = cp.set_heartbeat_lapsed(cp.set_current(s, 0, 0), True, 1)
    assert cp.offered_pwm(paused) == cp.PWM_OFF  # a pause stays a pause
    unenforced = cp.set_heartbeat_enforced(lapsed, False, 1)
    assert cp.allowed_ca(unenforced) == 1600
    default = cp.set_heartbeat_lapsed(cp.set_current(connected(pilot=Pilot.C_6V), 1600, 0), True, 1)
    assert cp.offered_pwm(default) == cp.PWM_OFF  # failsafe 0 (the default): stop
