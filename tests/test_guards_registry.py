"""Guards for charge points by LP: an operator's move, and the probation of a new station.

Each test names the mutation it kills. What is checked is what a user sees: the admin API
(``/api/stations``, ``/api/status``), Modbus, and what the station is sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from conftest import eventually, idle_data
from test_control import write
from test_guards_firmware import SERIAL, ScriptedStation, http, listed, until, web_settings

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig

__all__ = ["web_settings"]  # the fixture, shared with test_guards_firmware

NOT_PLUGGED = VehicleConfig(plug_in_after=None, reaction_s=0.05, max_current_a=32)
CHARGING = idle_data(pilot=p.Pilot.C_6V, pwm=26, contactor=True, currents_ma=(15_600,) * 3)


async def card(rig, lp: int) -> dict:
    """The status page's card of LP ``lp`` (``GET /api/status``)."""
    status, body = await http(rig, "GET", "/api/status")
    assert status == 200
    return next(c for c in body["charge_points"] if c["lp"] == lp)


class KeepAlive:
    """A Modbus controller that reads every 0.2 s: its heartbeat stays fresh (any answer counts,
    also an exception for an LP nobody serves)."""

    def __init__(self, client) -> None:
        async def run() -> None:
            while True:
                await client.read_input_registers(
                    REGISTER_MAP.address(1, "power"), count=1, device_id=1
                )
                await asyncio.sleep(0.2)

        self._task = asyncio.create_task(run())

    def stop(self) -> None:
        self._task.cancel()


# --- 2. a move resets what was written for the old LP ----------------------------------------


async def test_a_moved_station_starts_with_nothing_written_for_its_new_lp(make_rig, web_settings):
    """LP1's controller asked 16 A and turned heartbeat enforcement off; the station moves to
    LP4: nothing of that applies there. Its vehicle then plugs in: no current is offered.

    kills: ``move_station`` without ``cp.reassign``; ``reassign`` keeping the requested current
    or the heartbeat enforcement."""
    rig = await make_rig(web_settings)
    client = await rig.client()
    station = await rig.station(1, NOT_PLUGGED)
    assert await write(client, 1, "set_current", 1600) is None
    assert await write(client, 1, "heartbeat", 0) is None
    before = await card(rig, 1)
    assert before["requested_a"] == 16 and not before["heartbeat_enforced"]
    status, body = await http(rig, "POST", f"/api/stations/{station.serial}/move", json={"lp": 4})
    assert status == 200, body
    after = await card(rig, 4)
    assert after["requested_a"] == 0
    assert after["heartbeat_enforced"]
    station.plug_in()
    await asyncio.sleep(1.0)  # two polls with the vehicle plugged in
    assert station.pwm == 100 and not station.contactor
    # LP4's controller writes: it charges, and only by what LP4 was sent
    assert await write(client, 4, "set_current", 1000) is None
    await station.wait_for(lambda s: s.pwm == 16)


async def test_a_moved_station_falls_under_its_new_lp_heartbeat_enforcement(make_rig, web_settings):
    """Enforcement was off for LP1; after the move to LP4 it is on again (as after a start):
    when the controller goes quiet, LP4 stops.

    kills: ``reassign`` keeping ``enforce_heartbeat``."""
    rig = await make_rig(web_settings, heartbeat_timeout=1.5)
    client = await rig.client()
    alive = KeepAlive(client)
    station = await rig.station(1, VehicleConfig(plug_in_after=0.0, reaction_s=0.05))
    assert await write(client, 1, "heartbeat", 0) is None
    status, body = await http(rig, "POST", f"/api/stations/{station.serial}/move", json={"lp": 4})
    assert status == 200, body
    assert await write(client, 4, "set_current", 1600) is None
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=5)
    alive.stop()  # the controller goes quiet
    await station.wait_for(lambda s: s.pwm == 100, timeout=5)


def test_reassign_forgets_every_permission_of_the_old_lp():
    """Pure: what the old LP's controller wrote (current, contactor permission, phase target,
    heartbeat enforcement) is back to what a start gives.

    kills: ``reassign`` keeping any one of the four."""
    config = cp.ChargePointConfig(contactor_by_request=True, can_switch_phases=True)
    state = cp.observe(cp.initial_state(config), idle_data(pilot=p.Pilot.B_9V), 0.0)
    state = cp.set_current(state, 1600, 0.0)
    state = cp.set_contactor_allowed(state, True, 0.0)
    state = cp.set_phase_target(state, 1, 0.0)
    state = cp.set_heartbeat_enforced(state, False, 0.0)
    moved = cp.reassign(state, 1.0)
    assert moved.requested_ca == 0
    assert moved.contactor_allowed is False  # bridge-mqtt: closed only once allowed again
    assert moved.phase_target is None
    assert moved.enforce_heartbeat is True
    assert cp.target(moved, 1.0) == cp.Target(cp.PWM_OFF, False)


# --- the busy rule: a station that is gone is not busy -------------------------------------------


async def test_a_station_that_is_gone_can_be_moved_whatever_its_last_report_showed(
    make_rig, web_settings
):
    """Its last report showed a closed contactor, but the station is gone: it is listed as not
    charging and an operator may move it.

    kills: ``_busy`` ignoring ``point.state.connected``."""
    rig = await make_rig(web_settings)
    station = await ScriptedStation.connect(rig, data=CHARGING, obey=False)

    async def remembered() -> bool:
        row = await listed(rig, SERIAL)
        return bool(row and row["remembered"])

    await until(remembered)
    assert (await listed(rig, SERIAL))["charging"]
    await station.close()
    await eventually(lambda: SERIAL not in rig.bridge.link.sessions)
    row = await listed(rig, SERIAL)
    assert not row["connected"] and not row["charging"]
    status, body = await http(rig, "POST", f"/api/stations/{SERIAL}/move", json={"lp": 6})
    assert status == 200, body
    assert (await listed(rig, SERIAL))["lp"] == 6


# --- 7. probation: an LP is remembered only with fresh, plausible data ---------------------------


async def test_a_station_with_implausible_data_is_not_remembered_and_its_lp_is_freed(
    make_rig, web_settings
):
    """A peer that reports 400 V on every phase for three probation periods: its LP is not
    remembered; once it is gone, the LP is free for the next station.

    kills: probation remembering on any data (``fresh_data`` replaced by the latest data, or by
    ``connected``)."""
    rig = await make_rig(web_settings, lp_remember_after=0.5)
    forged = idle_data(voltages_mv=(400_000,) * 3)
    station = await ScriptedStation.connect(rig, data=forged)
    await asyncio.sleep(1.5)  # three probation periods, three polls
    row = await listed(rig, SERIAL)
    assert row["lp"] == 1 and row["connected"] and not row["remembered"]
    await station.close()
    await eventually(lambda: SERIAL not in rig.bridge.link.sessions)

    async def released() -> bool:
        return await listed(rig, SERIAL) is None

    await until(released)
    other = await rig.station(2, NOT_PLUGGED)
    assert (await listed(rig, other.serial))["lp"] == 1


async def test_a_station_whose_data_went_stale_is_not_remembered(make_rig, web_settings):
    """The station answers its first poll, then no more (the link drops it after 5 s). At the
    end of its 2 s probation its data are older than 3 polls (1.5 s): not remembered; released
    when the session ends.

    kills: probation ignoring the age of the data."""
    rig = await make_rig(web_settings, lp_remember_after=2.0)
    station = await ScriptedStation.connect(rig, data=idle_data())
    station.hold()  # the next poll is never answered
    await asyncio.sleep(3.0)
    row = await listed(rig, SERIAL)
    assert row is not None and not row["remembered"]
    await eventually(lambda: SERIAL not in rig.bridge.link.sessions, timeout=5)

    async def released() -> bool:
        return await listed(rig, SERIAL) is None

    await until(released)
    await station.close()


async def test_a_station_remembered_by_a_firmware_update_is_not_released_when_it_reboots(
    make_rig, web_settings
):
    """During its probation an operator updates the station (which remembers its LP); the
    station reboots: its charge point stays, with the current its controller set.

    kills: the probation releasing a remembered station when its session ends (``serial not in
    self._kept`` dropped)."""
    rig = await make_rig(web_settings, lp_remember_after=60.0)
    client = await rig.client()
    station = await rig.station(1, NOT_PLUGGED, firmware_after_update=5)
    assert await write(client, 1, "set_current", 1000) is None
    status, body = await http(
        rig,
        "POST",
        f"/api/stations/{station.serial}/firmware?timeout=10",
        data=b"\x01" * 4096,
    )
    assert status == 200, body
    await eventually(lambda: station.connections == 2 and station.connected)
    row = await listed(rig, station.serial)
    assert row["lp"] == 1 and row["remembered"]
    assert (await card(rig, 1))["requested_a"] == 10
    station.plug_in()
    await station.wait_for(lambda s: s.pwm == 16, timeout=3)


def test_the_probation_needs_data_no_older_than_three_polls():
    """Pure: the rule the probation applies (``fresh_data``): connected, plausible, at most
    ``max_age`` old.

    kills: ``fresh_data`` ignoring the age, the plausibility or the connection."""
    state = cp.observe(cp.initial_state(cp.ChargePointConfig()), idle_data(), 10.0)
    assert cp.fresh_data(state, 11.5, 1.5) is not None
    assert cp.fresh_data(state, 11.6, 1.5) is None
    assert cp.fresh_data(cp.disconnect(state, 10.5), 10.5, 1.5) is None
    forged = replace(idle_data(), voltages_mv=(400_000,) * 3)
    assert cp.fresh_data(cp.observe(state, forged, 11.0), 11.0, 1.5) is None


async def test_a_station_that_replaces_its_dead_session_during_probation_keeps_its_lp(
    make_rig, web_settings
):
    """A new station's connection goes silent; the station connects again (same serial). The
    dead session is dropped and the new one takes over while the LP is still on probation: the
    charge point stays, connected, on its LP.

    kills: the probation releasing a station that has a session again (``serial not in
    self.link.sessions`` dropped; with Python 3.11 the cancel of the old probation can be lost
    when it comes as the old session ends)."""
    rig = await make_rig(web_settings, lp_remember_after=60.0)
    first = await ScriptedStation.connect(rig, data=idle_data())
    sessions = rig.bridge.link.sessions
    dead = sessions[SERIAL]
    first.hold()  # silent from the next poll on: the link drops it after 5 s
    await asyncio.wait_for(first.holding.wait(), 3)
    second = await ScriptedStation.connect(rig, data=idle_data())
    await eventually(lambda: sessions.get(SERIAL) not in (None, dead), timeout=8)
    await asyncio.sleep(1.0)
    row = await listed(rig, SERIAL)
    assert row is not None and row["lp"] == 1 and row["connected"], row
    await first.close()
    await second.close()
