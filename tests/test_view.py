"""One view for every client: what a charge point looks like while its station is away.

The rule (view.py): fresh data as measured; then, for the station's own 300 s safety timeout,
nothing flows but the plug state is held, with a warning; then unplugged, with an error. The
end-to-end test reads Modbus and the openWB MQTT tree of the same station side by side.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from conftest import eventually, idle_data
from openwb_primary import Primary
from test_chargepoint import connected

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.evse.protocol import Pilot
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP, lp_base
from openwb_modbus_evse.service import Service
from openwb_modbus_evse.tools.simulator import VehicleConfig
from openwb_modbus_evse.view import (
    FAULT_ERROR,
    FAULT_OK,
    FAULT_WARNING,
    Freshness,
    next_change,
    show,
)

MQTT = cp.ChargePointConfig(controller="openwb-mqtt")


def _point(state: cp.State) -> cp.ChargePoint:
    point = cp.ChargePoint(cp.Identity("A" * 32, 1, "LP1", "SN"), state.config, max_data_age=15)
    point.state = state
    return point


def test_the_documented_rule_step_by_step():
    data = idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True, currents_ma=(16_000,) * 3)
    point = _point(cp.observe(cp.set_current(connected(MQTT, pilot=Pilot.B_9V), 1600, 0), data, 10))
    fresh = show(point, 10)
    assert (fresh.freshness, fresh.plugged, fresh.charging, fresh.fault) == (
        Freshness.FRESH,
        True,
        True,
        FAULT_OK,
    )
    assert fresh.power_w > 10_000 and fresh.phases_in_use == 3 and fresh.offered_a == 15.6
    assert next_change(point, 10) == 10 + 15  # data stale after max_data_age
    assert next_change(point, 26) == 10 + 300  # then the plug hold ends

    point.state = cp.disconnect(point.state, 11)
    for now in (11, 30, 10 + 300):  # 300 s: the station's own safety timeout
        held = show(point, now)
        assert held.freshness is Freshness.HOLD and held.plugged and not held.charging, now
        assert held.power_w == held.offered_a == 0 and held.voltages_v == (None, None, None)
        assert held.fault == FAULT_WARNING and "not connected" in held.fault_text
    assert next_change(point, 11) == 10 + 300
    assert next_change(point, 310.1) is None  # nothing changes by time alone any more
    gone = show(point, 10 + 300.1)
    assert gone.freshness is Freshness.NONE and not gone.plugged and gone.fault == FAULT_ERROR


def test_a_requested_pilot_interruption_holds_the_plug_and_is_no_fault():
    s = connected(MQTT, pilot=Pilot.B_9V)
    s = cp.start_cp_interruption(s, 10, 1)
    s = cp.observe(s, idle_data(pilot=Pilot.B_9V), 2)  # stopped: the hold begins
    assert s.sequence is not None and s.sequence.stage is cp.Stage.HOLD
    s = cp.observe(s, idle_data(pilot=Pilot.MINUS_12V, pwm=0), 3)  # state F hides the vehicle
    during = show(_point(s), 3)
    assert during.plugged and during.fault == FAULT_OK
    # The same -12 V without a requested interruption is a pilot fault.
    fault = show(_point(cp.observe(connected(MQTT), idle_data(pilot=Pilot.MINUS_12V), 1)), 1)
    assert fault.fault == FAULT_ERROR and "state F" in fault.fault_text and not fault.plugged


def test_a_lapsed_heartbeat_and_a_failed_phase_switch_are_warnings():
    lapsed = replace(connected(MQTT, pilot=Pilot.B_9V), heartbeat_lapsed=True)
    shown = show(_point(lapsed), 0)
    assert shown.fault == FAULT_WARNING and "openwb-mqtt" in shown.fault_text
    not_enforced = replace(lapsed, enforce_heartbeat=False)
    assert show(_point(not_enforced), 0).fault == FAULT_OK
    failed = replace(connected(MQTT, pilot=Pilot.B_9V), switch_failed=True)
    assert "phase-switch" in show(_point(failed), 0).fault_text


async def test_modbus_and_openwb_mqtt_tell_the_same_story_during_an_outage(broker, settings):
    """A station charging under the openWB primary goes away; Modbus and the MQTT tree agree
    while it is away (plug held, nothing flowing, a warning) and after 300 s (unplugged)."""
    loop = asyncio.get_running_loop()
    skew = [0.0]  # the service's clock runs ahead by this much: 300 s without waiting for them
    settings = broker.settings(settings, controller="openwb-mqtt")
    service = Service(settings, clock=lambda: loop.time() + skew[0])
    await service.start()
    from pymodbus.client import AsyncModbusTcpClient

    from openwb_modbus_evse.tools.simulator import VirtualStation, virtual_serial

    station = VirtualStation(
        virtual_serial(1),
        bridge=("127.0.0.1", service.link.port),
        vehicle=VehicleConfig(plug_in_after=0.0, reaction_s=0.05),
        reconnect_delay=0.2,
        request_timeout=2.0,
    )
    client = AsyncModbusTcpClient("127.0.0.1", port=service.modbus.port, timeout=3, retries=0)
    primary = Primary(broker.port)
    try:
        await eventually(lambda: service.mqtt.connected)
        await station.start()
        await client.connect()
        async with primary.beating():
            await station.wait_for(lambda s: s.plugged)
            await primary.cycle(16)
            await station.wait_for(lambda s: s.contactor and any(s.currents_ma))

            async def both() -> tuple[dict, dict]:
                rr = await client.read_input_registers(lp_base(1), count=100, device_id=1)
                return REGISTER_MAP.decode(rr.registers), await primary.read(0.3)

            point = service.registry.at(1)
            await eventually(lambda: cp.charging(point.state))  # the service has seen it
            modbus, mqtt = await both()
            assert modbus["plugged"] == 1 and mqtt["plug_state"] is True
            assert modbus["charging"] == 1 and mqtt["charge_state"] is True
            assert mqtt["fault_state"] == 0

            # Remembered (lp_remember_after): its LP outlives the connection.
            await eventually(lambda: station.serial in service.registry.store.lp_assignments())
            await station.stop()  # the station's Wi-Fi is gone
            skew[0] = 20.0  # 20 s later
            # What its timer does once the data are stale (test_openwb_mqtt waits for that).
            service.openwb.publish(service.openwb.trees[0])
            modbus, mqtt = await both()
            assert modbus["plugged"] == 1 and mqtt["plug_state"] is True  # held on both
            assert modbus["charging"] == 0 and mqtt["charge_state"] is False
            assert modbus["power"] == 0 and mqtt["power"] == 0
            assert mqtt["fault_state"] == 1 and "not connected" in mqtt["fault_str"]

            skew[0] = 301.0  # past the station's own safety timeout
            service.openwb.publish(service.openwb.trees[0])
            modbus, mqtt = await both()
            assert modbus["plugged"] == 0 and mqtt["plug_state"] is False
            assert modbus["charging"] == 0 and mqtt["charge_state"] is False
            assert mqtt["fault_state"] == 2 and "not connected" in mqtt["fault_str"]
    finally:
        client.close()
        await station.stop()
        await service.stop()
