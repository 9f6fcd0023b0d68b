"""Guards for the openWB MQTT secondary API: each station on its own tree only, the fault shown
for a pilot fault (not for a requested interruption), and no commands once shutdown began.

A real mosquitto, a primary as openWB's module behaves (tests/openwb_primary.py), the service
in-process. Each test names the mutation it kills.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from conftest import eventually, idle_data, station_config
from openwb_primary import Primary
from test_guards_firmware import SERIAL, ScriptedStation

from openwb_modbus_evse.config import StationConfig
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.evse.protocol import RequestType
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

FAST_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)


@pytest.fixture
def mqtt_settings(settings, broker):
    """Every station driven by the openWB primary."""
    return broker.settings(settings, mqtt_heartbeat_timeout=5.0, controller="openwb-mqtt")


async def connected(rig) -> None:
    await eventually(lambda: rig.bridge.mqtt.connected)


def pwm_sent(station, since: int = 0) -> list[int]:
    return [r.pwm for r in station.received[since:] if r.type is RequestType.SET_PWM]


# --- a station answers on its own tree only ----------------------------------------------------


async def test_a_station_with_its_own_tree_is_not_driven_or_shown_on_the_default_one(
    broker, mqtt_settings, make_rig
):
    """The station has ``duo_num = 1`` and no LP: it gets LP1, whose default tree is duo 0.
    It is shown and driven on duo 1 only; duo 0 serves nobody.

    kills: ``point_of`` without its ``tree_of(point) == tree`` check (duo 0 would drive it),
    ``tree_of`` by LP before the configured tree or without it (the station would have no
    heartbeat), and ``point_of`` finding a configured tree's station by LP."""
    own = StationConfig(serial=virtual_serial(1), duo_num=1)
    rig = await make_rig(mqtt_settings, station=(own,))
    await connected(rig)
    default, mine = Primary(broker.port, duo=0), Primary(broker.port, duo=1)
    async with default.beating():  # one heartbeat for both trees (same prefix)
        # Fresh before the station connects: the station takes it over through its own tree.
        await asyncio.sleep(0.5)
        station = await rig.station(1, FAST_VEHICLE)
        await station.wait_for(lambda s: s.plugged)
        await default.send("set_current", 16)
        await asyncio.sleep(1.0)
        assert station.pwm == 100 and not station.contactor
        shown = await default.read(0.5)
        assert shown["serial_number"] == "" and shown["fault_state"] == 2, shown
        assert "no station is LP1" in shown["fault_str"]
        await mine.send("set_current", 10)
        await station.wait_for(lambda s: s.pwm == 16 and s.contactor, timeout=4)
        await asyncio.sleep(0.6)
        values = await mine.read(0.5)
    assert (
        values["serial_number"] == rig.serial_number(station.serial)
        and values["charge_state"] is True
    )


# --- the fault published for a pilot fault -------------------------------------------------------


async def test_a_requested_pilot_interruption_is_not_published_as_a_fault(
    broker, mqtt_settings, make_rig
):
    """While the station holds state F because the primary asked for it, the pilot reads as a
    fault: the primary must not be told there is one (fault_state 0).

    kills: ``_warning`` reporting a pilot fault during the interruption's hold."""
    rig = await make_rig(mqtt_settings)
    await connected(rig)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await rig.station(1, FAST_VEHICLE)
        await station.wait_for(lambda s: s.plugged)
        await primary.cycle(16)
        await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=4)
        await primary.send("cp_interruption_duration", 4)
        await station.wait_for(lambda s: s.pwm == 0, timeout=4)
        await eventually(lambda: rig.point(station.serial).state.data.pwm == 0)
        await asyncio.sleep(0.6)  # the reports during the hold have been published
        values = await primary.read(0.5)
    assert values["fault_state"] == 0, values
    assert values["fault_str"] == ""


async def test_a_pilot_fault_while_an_interruption_still_stops_is_published(
    broker, mqtt_settings, make_rig
):
    """An interruption was asked for, but the contactor has not opened yet (the stop is still
    under way) when the pilot reads a fault: that is a real fault (fault_state 2).

    kills: ``_warning`` excusing a pilot fault during any sequence, not only the hold."""
    rig = await make_rig(mqtt_settings, station=(StationConfig(serial=SERIAL, lp=1),))
    await connected(rig)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await ScriptedStation.connect(rig, data=idle_data(pilot=p.Pilot.B_9V))
        await primary.cycle(16)
        await eventually(lambda: station.data.pwm == 26)
        station.data = replace(station.data, pilot=p.Pilot.C_6V, currents_ma=(15_600,) * 3)
        await eventually(lambda: station.data.contactor)  # charging
        station.obey = False  # from now on it acknowledges but keeps PWM and contactor
        since = len(station.requests)
        await primary.send("cp_interruption_duration", 10)

        def stop_sent() -> bool:  # the interruption began: PWM 100 % first
            return any(
                r.type is RequestType.SET_PWM and r.pwm == 100 for r in station.requests[since:]
            )

        await eventually(stop_sent)
        station.data = replace(station.data, pilot=p.Pilot.FAULT)
        await asyncio.sleep(1.2)  # reported, and published
        values = await primary.read(0.5)
        await station.close()
    assert values["fault_state"] == 2, values
    assert "control-pilot fault" in values["fault_str"]


# --- no commands once shutdown began -----------------------------------------------------------


async def test_commands_that_arrive_during_shutdown_are_ignored(broker, mqtt_settings, make_rig):
    """The shutdown has sent PWM 100 % and waits for the vehicle (1.5 s) when the primary sends
    set_current 16: it is not carried out, the station gets nothing but PWM 100 %.

    kills: ``OpenWbSecondary`` carrying out commands while closing (``_handled`` ignoring
    ``_closing``)."""
    rig = await make_rig(mqtt_settings, stop_timeout=3.0, station=(station_config(1, lp=1),))
    await connected(rig)
    primary = Primary(broker.port)
    slow = VehicleConfig(plug_in_after=0.0, reaction_s=1.5, max_current_a=32)
    async with primary.beating():
        station = await rig.station(1, slow)
        await station.wait_for(lambda s: s.plugged)
        await primary.cycle(16)
        await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=8)
        stopping = asyncio.create_task(rig.bridge.stop())
        await station.wait_for(lambda s: s.pwm == 100, timeout=3)
        since = len(station.received)
        await primary.send("set_current", 16)
        await primary.send("set_current", 10)
        await stopping
    assert [pwm for pwm in pwm_sent(station, since) if pwm != 100] == []
    assert station.pwm == 100 and not station.contactor
