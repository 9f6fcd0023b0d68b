"""Why a charge point does not charge: view.reasons, one case per reason, from real states."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import aiohttp
from conftest import free_port, idle_data
from test_chargepoint import charging_state, connected

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.evse.protocol import Pilot, Proximity
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.view import HeartbeatInfo, reasons

BEAT = HeartbeatInfo("Modbus request", age_s=75.0, timeout_s=60.0, received=True)


class Point:
    """A :class:`~openwb_modbus_evse.view.Viewable` around a state."""

    def __init__(self, state: cp.State, lp: int | None = 1) -> None:
        self.identity = cp.Identity("A" * 32, lp, "garage", "SN")
        self.state = state
        self.max_data_age = 15.0
        self.energy_wh = 0.0


def why(state: cp.State, now: float = 1.0, **kwargs) -> list[tuple[str, str, bool]]:
    return [(r.code, r.text, r.blocking) for r in reasons(Point(state), now, **kwargs)]


def codes(state: cp.State, now: float = 1.0, **kwargs) -> list[str]:
    return [code for code, _, _ in why(state, now, **kwargs)]


DEFAULT = cp.ChargePointConfig()


def plugged(config: cp.ChargePointConfig = DEFAULT, **data) -> cp.State:
    state = connected(config, pilot=Pilot.B_9V, **data)
    return cp.set_heartbeat_lapsed(state, False, 0)


def offered(state: cp.State, amps: int = 16, now: float = 0.0, **data) -> cp.State:
    """The current set, and the station reporting the PWM that offers it."""
    state = cp.set_current(state, amps * 100, now)
    return cp.observe(state, idle_data(pwm=cp.offered_pwm(state), **data), now)


def test_offline_never_seen_and_since_when_and_why():
    assert why(cp.initial_state(cp.ChargePointConfig())) == [
        ("offline", "the station has not connected since the service started", True)
    ]
    gone = cp.disconnect(plugged(), 5.0)
    [(code, text, _)] = why(gone, 200.0, last_disconnect=(10.0, "no data for 15 s"))
    assert code == "offline" and "for 3 min" in text and "(no data for 15 s)" in text
    [(_, text, _)] = why(gone, 50.0)  # no reason known: since its last report
    assert "offline for 50 s" in text


def test_no_fresh_data_and_faults():
    assert codes(plugged(), 30.0) == ["no_data"]  # last report at 0, max_data_age 15
    assert why(connected(pilot=Pilot.FAULT))[0][:2] == ("fault", "control-pilot fault (state E)")
    [(code, text, _)] = why(connected(pilot=Pilot.B_9V, voltages_mv=(400_000, 0, 0)))
    assert code == "fault" and "implausible" in text and "400 V" in text
    failed = cp.State(**{**vars(plugged()), "switch_failed": True})
    assert codes(failed) == ["fault"] and "phase-switch" in why(failed)[0][1]


def test_sequences_in_progress():
    state = cp.start_cp_interruption(charging_state(), 10, 1.0)
    [(code, text, _)] = why(state)
    assert code == "cp_interruption" and "stopping first" in text
    held = cp.observe(state, idle_data(pilot=Pilot.B_9V), 2.0)  # contactor open: hold begins
    assert held.sequence is not None and held.sequence.stage is cp.Stage.HOLD
    assert "state F: 7 s left" in why(held, 5.0)[0][1]
    switching = cp.ChargePointConfig(can_switch_phases=True)
    state = cp.trigger_phase_switch(cp.set_phase_target(plugged(switching), 1, 0), 0)
    assert why(state)[0][:2] == ("phase_switch", "phase switch to 1 phase(s): stopping")


def test_a_station_that_is_not_served():
    state = cp.set_current(plugged(), 1600, 0)
    [reason] = reasons(Point(state, lp=None), 1.0)
    assert reason.code == "not_served" and "kept safe" in reason.text


def test_no_vehicle():
    state = cp.set_heartbeat_lapsed(connected(), False, 0)
    assert why(state) == [("no_vehicle", "no vehicle is plugged in", True)]


def test_heartbeat_none_yet_lapsed_and_no_controller_running():
    lapsed = cp.set_heartbeat_lapsed(plugged(), True, 0)
    [(code, text, _)] = why(lapsed, heartbeat=BEAT)
    assert code == "heartbeat_lapsed"
    assert text == (
        "the controller modbus's heartbeat lapsed: no Modbus request for 75 s (timeout 60 s)"
    )
    never = HeartbeatInfo("global_data message", 3.0, 60.0, received=False)
    [(code, text, _)] = why(lapsed, heartbeat=never)
    assert code == "heartbeat_none" and "first global_data message" in text
    assert codes(lapsed) == ["heartbeat_none"]  # its controller runs no heartbeat at all
    off = cp.set_heartbeat_enforced(lapsed, False, 0)  # not enforced: the lapse does not count
    assert codes(off) == ["no_current"]


def test_no_current_requested_names_the_controller_or_the_owner():
    assert why(plugged()) == [("no_current", "the controller modbus requests no current", True)]
    manual = plugged(cp.ChargePointConfig(controller="manual", heartbeat=False))
    assert why(manual) == [("no_current", "the owner stopped charging (manual)", True)]


def test_cable():
    state = cp.set_current(plugged(proximity=Proximity.NO_CABLE), 1600, 0)
    assert codes(state) == ["cable"]
    small = offered(
        plugged(proximity=Proximity.CABLE_13A), pilot=Pilot.B_9V, proximity=Proximity.CABLE_13A
    )
    assert ("cable", "the cable allows 13 A", False) in why(small)


def test_contactor_kept_open_by_the_controller():
    bridge = cp.ChargePointConfig(controller="bridge-mqtt", contactor_by_request=True)
    state = cp.set_current(plugged(bridge), 1600, 0)
    assert why(state) == [
        ("contactor", "the controller bridge-mqtt keeps the contactor open", True)
    ]


def test_supply_share_none_or_limiting():
    shared = cp.ChargePointConfig(supply_limited=True)
    state = cp.set_current(plugged(shared), 1600, 0)
    assert codes(state) == ["supply"] and "waits its turn" in why(state)[0][1]
    limited = offered(cp.set_supply_cap(state, 1000, 0), pilot=Pilot.B_9V)
    assert ("supply", "the shared supply grants 10 A", False) in why(limited)


def test_station_limit():
    small = cp.ChargePointConfig(max_current_a=10)
    assert ("station", "the station allows 10 A", False) in why(
        offered(plugged(small), 16, pilot=Pilot.B_9V)
    )


def test_vehicle_not_asking_and_pwm_pending():
    state = cp.set_current(plugged(), 1600, 0)
    assert codes(state) == ["pwm_pending"]  # the station has not reported the PWM yet
    state = offered(plugged(), pilot=Pilot.B_9V)
    assert codes(state) == ["vehicle_not_asking"]
    assert "state B" in why(state)[0][1]


def test_contactor_wait_says_the_seconds_left():
    config = cp.ChargePointConfig(contactor_min_off=60)
    state = cp.set_heartbeat_lapsed(cp.initial_state(config), False, 0)
    state = cp.set_current(state, 1600, 0)
    pwm = cp.offered_pwm(cp.observe(state, idle_data(pilot=Pilot.B_9V), 0))
    on = idle_data(pilot=Pilot.C_6V, pwm=pwm, contactor=True, currents_ma=(16_000,) * 3)
    state = cp.observe(state, on, 0)
    assert why(state, 0) == []  # charging as asked
    state = cp.observe(state, idle_data(pilot=Pilot.C_6V, pwm=pwm), 10)  # opened (a pause)
    [(code, text, blocking)] = why(state, 25)
    assert code == "contactor_wait" and blocking
    assert text == "the contactor rests after opening (contactor_min_off): 45 s left"


def test_charging_as_asked_or_idle_vehicle():
    assert why(charging_state(amps=16)) == []
    idle = cp.observe(charging_state(), idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True), 1.0)
    assert why(idle) == [("vehicle_idle", "the vehicle draws no current now", False)]


# --- end to end: what /api/status says about a real (virtual) station ------------------------


async def status_reasons(rig) -> list[tuple[str, str]]:
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        [point] = (await response.json())["charge_points"]
    return [(r["code"], r["text"]) for r in point["reasons"]]


async def test_the_contactor_rest_after_a_stop_is_explained_with_seconds_left(make_rig, settings):
    """The first hour's surprise: "plugged in, 15.6 A offered, 0 W" and no word why."""
    rig = await make_rig(
        replace(settings, metrics_host="127.0.0.1", metrics_port=free_port()),
        contactor_min_off=30.0,
    )
    station = await rig.station(1)
    client = await rig.client()
    set_current = REGISTER_MAP.address(1, "set_current")
    await client.write_register(set_current, 1600, device_id=1)
    await station.wait_for(lambda s: s.contactor)
    assert await status_reasons(rig) == []
    await client.write_register(set_current, 0, device_id=1)
    await station.wait_for(lambda s: not s.contactor)
    await client.write_register(set_current, 1600, device_id=1)
    await station.wait_for(lambda s: s.pwm == 26)  # 15.6 A offered, the contactor stays open
    [(_, text)] = await eventually_value(rig, "contactor_wait")
    assert re.fullmatch(
        r"the contactor rests after opening \(contactor_min_off\): (2\d|30) s left", text
    ), text
    assert not station.contactor


async def eventually_value(rig, code: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    async def seen() -> bool:
        found[:] = await status_reasons(rig)
        return any(c == code for c, _ in found)

    for _ in range(50):
        if await seen():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{code} not among {found}")


async def test_heartbeat_lapse_and_offline_are_explained(make_rig, settings):
    rig = await make_rig(
        replace(settings, metrics_host="127.0.0.1", metrics_port=free_port()),
        heartbeat_timeout=0.5,
    )
    station = await rig.station(1)
    client = await rig.client()
    await client.write_register(REGISTER_MAP.address(1, "set_current"), 1600, device_id=1)
    [(_, text)] = await eventually_value(rig, "heartbeat_lapsed")
    assert re.fullmatch(
        r"the controller modbus's heartbeat lapsed: no Modbus request for \d+ s "
        r"\(timeout 0.5 s\)",
        text,
    ), text
    await station.stop()
    [(_, text)] = await eventually_value(rig, "offline")
    assert re.fullmatch(
        r"the station is offline for \d+ s \(the station closed the connection\)", text
    ), text


def test_a_lapse_with_a_failsafe_current_limits_instead_of_stopping():
    config = cp.ChargePointConfig(failsafe_ca=800)
    state = offered(cp.set_heartbeat_lapsed(plugged(config), True, 0), pilot=Pilot.B_9V)
    assert state.data is not None and state.data.pwm == 13  # 8 A offered
    found = why(state, heartbeat=BEAT)
    assert (
        "heartbeat_lapsed",
        "the controller modbus's heartbeat lapsed: no Modbus request for 75 s (timeout 60 s); "
        "the failsafe current 8 A applies",
        False,
    ) in found
    assert found[0][0] == "vehicle_not_asking"  # what blocks comes first


def test_after_a_pilot_interruption_until_the_station_resumes():
    state = cp.State(
        **{**vars(plugged()), "resume_plugged": True, "data": idle_data(pilot=Pilot.MINUS_12V)}
    )
    assert why(state) == [
        ("cp_interruption", "pilot interruption over: waiting for the station to resume", True)
    ]


def test_the_contactor_about_to_close_and_limits_below_6_a():
    state = offered(plugged(), pilot=Pilot.C_6V)  # asks, offered, the contactor not yet closed
    assert why(state) == [("contactor_closing", "the contactor is about to close", True)]
    tiny = cp.set_current(plugged(cp.ChargePointConfig(max_current_a=5)), 1600, 0)
    assert why(tiny) == [("limit", "the station's limits leave less than 6 A", True)]
