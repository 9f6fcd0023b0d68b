"""What controllers see and what the stations do when a controller goes wrong (issue 18):
a monitor does not keep a dead controller's charging alive, a lapse can fall back to a failsafe
current, and a heartbeat that drives nothing says nothing."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from conftest import eventually, metric, station_config
from pymodbus.client import AsyncModbusTcpClient
from test_control import FAST_VEHICLE, read, start_charging, write


async def dashboard(rig, address: str) -> AsyncModbusTcpClient:
    """A Modbus client from another loopback address (a status page, a monitor)."""
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=rig.modbus_port, timeout=3, retries=0, source_address=(address, 0)
    )
    assert await client.connect()
    rig.clients.append(client)
    return client


async def test_a_monitor_that_only_reads_does_not_keep_a_dead_controllers_charging(
    make_rig, settings
):
    rig = await make_rig(settings, heartbeat_timeout=1.0)
    controller = await rig.client()  # 127.0.0.1
    station = await start_charging(rig, controller)
    monitor = await dashboard(rig, "127.0.0.2")
    source = "openwb_modbus_evse_heartbeat_source_info"
    assert metric(rig.bridge, source, controller="modbus", source="127.0.0.1") == 1

    async def poll() -> None:
        while True:
            await read(monitor)
            await asyncio.sleep(0.1)

    polling = asyncio.create_task(poll())
    try:
        # The controller is gone; the monitor keeps reading: charging stops all the same.
        await station.wait_for(lambda s: s.pwm == 100, timeout=4)
        assert rig.bridge.modbus_heartbeat.lapses == 1
        assert await write(controller, 1, "set_current", 1600) is None  # the controller is back
        await station.wait_for(lambda s: s.pwm == 26, timeout=3)
    finally:
        polling.cancel()


async def test_before_anyone_writes_any_client_that_may_write_keeps_the_heartbeat(
    make_rig, settings
):
    rig = await make_rig(settings, heartbeat_timeout=1.0)
    await rig.station(1, FAST_VEHICLE)
    monitor = await dashboard(rig, "127.0.0.3")
    for _ in range(15):  # 1.5 s of reads, longer than the timeout
        await read(monitor)
        await asyncio.sleep(0.1)
    assert not rig.bridge.modbus_heartbeat.lapsed  # openWB's rule: any request counts


async def test_a_lapse_falls_back_to_the_failsafe_current_the_safe_way(make_rig, settings):
    rig = await make_rig(
        settings, heartbeat_timeout=1.0, station=(station_config(1, 1, failsafe_current=8),)
    )
    client = await rig.client()
    station = await start_charging(rig, client)  # 16 A: PWM 26 %
    await station.wait_for(lambda s: s.pwm == 13, timeout=4)  # 8 A, not a stop
    assert station.contactor  # a lower current needs no stop
    point = rig.point(station.serial)
    assert point.state.heartbeat_lapsed and point.state.requested_ca == 1600
    await read(client)
    await station.wait_for(lambda s: s.pwm == 26, timeout=3)


async def test_a_heartbeat_that_drives_no_station_says_nothing(make_rig, settings, broker, caplog):
    caplog.set_level(logging.INFO)
    # An openWB-only setup: no station is driven over Modbus.
    rig = await make_rig(broker.settings(settings, controller="openwb-mqtt"), heartbeat_timeout=0.5)
    station = await rig.station(1, FAST_VEHICLE)
    await eventually(lambda: station.serial in rig.bridge.link.sessions)
    await eventually(lambda: rig.bridge.modbus_heartbeat.lapsed, timeout=2)
    assert not any("no Modbus request" in r.getMessage() for r in caplog.records)


# --- what a restart keeps --------------------------------------------------------------------


async def test_a_restart_keeps_the_plug_state_the_contactor_rest_and_a_new_stations_energy(
    make_rig, settings
):
    settings = replace(settings, contactor_min_off=30.0, lp_remember_after=60.0)
    rig = await make_rig(settings)
    client = await rig.client()
    station = await start_charging(rig, client)  # a new station, not remembered yet
    point = rig.point(station.serial)
    await eventually(lambda: point.energy_wh > 0)
    assert await write(client, 1, "set_current", 0) is None  # stop: the contactor opens
    await eventually(lambda: point.state.closed_not_before is not None)
    energy = point.energy_wh
    await rig.close()

    rig = await make_rig(settings)
    client = await rig.client()
    again = rig.bridge.registry.get(station.serial)
    assert again is not None and again.energy_wh >= energy  # energy is never lost
    block = await read(client)
    assert block["plugged"] == 1 and block["energy_imported"] == int(again.energy_wh)
    # The contactor's rest goes on across the restart: a new current does not close it yet.
    station = await rig.station(1, FAST_VEHICLE)
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: s.pwm == 26, timeout=3)
    await asyncio.sleep(1.0)
    assert not station.contactor
    assert rig.point(station.serial).state.closed_not_before is not None
