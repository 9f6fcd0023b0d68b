"""Control end to end over TCP: heartbeat, phase switch, pilot interruption, faults."""

import asyncio
import logging
import shlex
import sys

from conftest import eventually, station_config

from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig, VirtualStation, virtual_serial

ADDR = REGISTER_MAP.address
FAST_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)


async def write(client, lp, name, value):
    rr = await client.write_register(ADDR(lp, name), value, device_id=1)
    return None if not rr.isError() else rr.exception_code


async def read(client, lp=1):
    rr = await client.read_input_registers(ADDR(lp, "power"), count=100, device_id=1)
    assert not rr.isError(), rr
    return REGISTER_MAP.decode(rr.registers)


async def start_charging(rig, client, index=1, lp=1, amps=16):
    station = await rig.station(index, FAST_VEHICLE)
    await station.wait_for(lambda s: s.plugged)
    assert await write(client, lp, "set_current", amps * 100) is None
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    return station


# --- heartbeat -------------------------------------------------------------------------------


async def test_heartbeat_lapse_stops_charging_and_requests_bring_it_back(
    make_rig, settings, caplog
):
    caplog.set_level(logging.INFO)
    rig = await make_rig(settings, heartbeat_timeout=1.5)
    client = await rig.client()
    station = await start_charging(rig, client)
    loop = asyncio.get_running_loop()
    await read(client)
    last_request = loop.time()
    await station.wait_for(lambda s: s.pwm == 100, timeout=4)
    lapse_delay = loop.time() - last_request - 1.5
    assert -0.05 < lapse_delay < 1.0  # within 1 s of the deadline
    await station.wait_for(lambda s: not s.contactor, timeout=3)  # after the vehicle stopped
    assert rig.point(station.serial).state.requested_ca == 1600  # kept
    assert rig.bridge.modbus_heartbeat.lapses == 1
    assert any("heartbeat: no Modbus request" in r.getMessage() for r in caplog.records)

    await read(client)  # any request: the current applies again
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=3)
    assert rig.bridge.modbus_heartbeat.recoveries == 1


async def test_heartbeat_enforcement_is_per_lp(make_rig, settings):
    rig = await make_rig(settings, heartbeat_timeout=1.0)
    client = await rig.client()
    one = await start_charging(rig, client, index=1, lp=1)
    two = await start_charging(rig, client, index=2, lp=2)
    assert await write(client, 1, "heartbeat", 0) is None
    await two.wait_for(lambda s: s.pwm == 100, timeout=3)
    assert one.pwm == 26 and one.contactor  # LP1 does not enforce the heartbeat
    assert await write(client, 1, "heartbeat", 1) is None  # a request: recovery for LP2 too
    await two.wait_for(lambda s: s.pwm == 26, timeout=3)


# --- phase switch ------------------------------------------------------------------------------


def relay_command(tmp_path, exit_code=0, sleep=0.0):
    """A phase-switch command that records its argument in a file."""
    out = tmp_path / "relay.txt"
    code = (
        f"import sys, time; time.sleep({sleep}); "
        f"open({str(out)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit({exit_code})"
    )
    return shlex.join([sys.executable, "-c", code]), out


async def test_phase_switch_sequence_with_a_relay_command(make_rig, settings, tmp_path):
    command, out = relay_command(tmp_path, sleep=0.2)
    rig = await make_rig(settings, station=(station_config(1, lp=1, phase_switch_command=command),))
    client = await rig.client()
    station = await start_charging(rig, client)
    assert await write(client, 1, "phase_target", 1) is None
    assert await write(client, 1, "phase_switch_trigger", 1) is None
    await station.wait_for(lambda s: s.pwm == 100, timeout=2)  # safe stop first
    assert station.contactor or not any(station.currents_ma)
    assert await write(client, 1, "set_current", 1000) is None  # kept for after the switch
    assert await write(client, 1, "cp_interruption", 5) == 6  # busy
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    assert not out.exists() or out.read_text() == ""  # command only after the contactor opened
    await eventually(lambda: out.exists() and out.read_text() == "1\n", timeout=3)
    assert station.pwm == 100  # pause
    await station.wait_for(lambda s: s.pwm == 16 and s.contactor, timeout=3)  # 10 A, resumed
    assert rig.point(station.serial).state.phases == 1


async def test_failed_phase_switch_command_leaves_charging_stopped(
    make_rig, settings, tmp_path, caplog
):
    command, out = relay_command(tmp_path, exit_code=3)
    rig = await make_rig(settings, station=(station_config(1, lp=1, phase_switch_command=command),))
    client = await rig.client()
    station = await start_charging(rig, client)
    assert await write(client, 1, "phase_target", 1) is None
    assert await write(client, 1, "phase_switch_trigger", 1) is None
    await eventually(lambda: out.exists(), timeout=4)
    await eventually(lambda: any("exit code 3" in r.getMessage() for r in caplog.records))
    await asyncio.sleep(1.0)
    assert station.pwm == 100 and not station.contactor
    values = await read(client)
    assert values["offered_current"] == 0 and values["charging"] == 0


async def test_phase_switch_without_a_command_refuses_other_targets_with_a_reason(
    make_rig, settings, caplog
):
    rig = await make_rig(settings)
    client = await rig.client()
    await rig.station(1, FAST_VEHICLE)
    assert await write(client, 1, "phase_target", 1) == 3
    assert any("no phase_switch_command" in r.getMessage() for r in caplog.records)
    assert await write(client, 1, "phase_target", 3) is None


# --- control-pilot interruption ------------------------------------------------------------


async def test_cp_interruption_holds_state_f_then_resumes(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    station = await start_charging(rig, client)
    loop = asyncio.get_running_loop()
    assert await write(client, 1, "cp_interruption", 2) is None
    await station.wait_for(lambda s: s.pwm == 100)
    await station.wait_for(lambda s: s.pwm == 0 and not s.contactor, timeout=3)
    entered = loop.time()
    assert await write(client, 1, "cp_interruption", 1) == 6  # one at a time: busy
    await station.wait_for(lambda s: s.pwm == 26, timeout=4)
    assert 1.8 < loop.time() - entered < 3.0
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=3)


async def test_shutdown_that_leaves_charging_ends_a_pilot_interruption(make_rig, settings):
    """stop_charging_on_shutdown = false: the vehicle is not left in state F for the station's
    own timeout (minutes) because the service stopped during a 30 s interruption."""
    rig = await make_rig(settings, stop_charging_on_shutdown=False)
    client = await rig.client()
    station = await start_charging(rig, client)
    assert await write(client, 1, "cp_interruption", 30) is None
    await station.wait_for(lambda s: s.pwm == 0 and not s.contactor, timeout=3)
    await rig.bridge.stop()
    assert station.pwm == 26  # the current is offered again before the connection closes


# --- faults --------------------------------------------------------------------------------


async def test_unplug_opens_the_contactor_at_once(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    station = await start_charging(rig, client)
    station.unplug()
    await station.wait_for(lambda s: not s.contactor and s.pwm == 100, timeout=2)


async def test_station_gone_shows_no_data_then_resumes_through_the_normal_sequence(
    make_rig, settings
):
    rig = await make_rig(settings, station=(station_config(1, lp=1),))  # poll interval 0.5 s
    client = await rig.client()
    station = await start_charging(rig, client)
    await station.stop()  # the station drops off the network
    loop = asyncio.get_running_loop()
    gone = loop.time()
    while (await read(client))["voltage_l1"] is not None:
        await asyncio.sleep(0.05)
    assert loop.time() - gone < 3 * 0.5 + 0.3
    values = await read(client)
    # what clients add up reads 0, not -1; the vehicle counts as plugged (a short outage)
    assert values["power"] == values["current_l1"] == values["power_l1"] == 0
    assert values["charging"] == values["offered_current"] == 0
    assert values["plugged"] == 1
    assert values["energy_imported"] is not None  # the counter stays

    # The station comes back after a reboot: PWM 100, contactor open, vehicle still plugged.
    reborn = VirtualStation(
        station.serial, bridge=("127.0.0.1", rig.bridge.link.port), vehicle=FAST_VEHICLE
    )
    rig.stations.append(reborn)
    await reborn.start()
    await reborn.wait_for(lambda s: s.pwm == 26, timeout=3)  # the current in force, again
    await reborn.wait_for(lambda s: s.contactor, timeout=3)  # after the vehicle asked
    await eventually(lambda: rig.point(station.serial).state.data.contactor)
    assert (await read(client))["charging"] == 1


async def test_silent_station_is_dropped_and_reconnects(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    station = await rig.station(1, FAST_VEHICLE, request_timeout=10.0)  # the firmware's 10 s
    await station.wait_for(lambda s: s.plugged)
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: s.contactor)
    session = rig.bridge.link.session(station.serial)
    station.set_silent(True)
    await eventually(lambda: session.closed, timeout=7)
    assert session.close_reason == "no response within 5 s"  # the bridge gave up first
    assert (await read(client))["voltage_l1"] is None
    station.set_silent(False)
    await eventually(lambda: station.serial in rig.bridge.link.sessions, timeout=3)
    assert station.connections == 2
    await eventually(lambda: rig.point(station.serial).state.data_at > session.latest_at)
    assert (await read(client))["voltage_l1"] is not None


async def test_two_virtual_stations_get_their_own_lp(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    await start_charging(rig, client, index=1, lp=1, amps=10)
    await start_charging(rig, client, index=2, lp=2, amps=16)
    await asyncio.sleep(0.6)
    assert (await read(client, 1))["offered_current"] == 9.6
    assert (await read(client, 2))["offered_current"] == 15.6
    assert rig.point(virtual_serial(2)).identity.lp == 2


# --- contactor minimum off time ----------------------------------------------------------------


async def test_a_controller_toggling_every_100_ms_gets_one_cycle_per_minimum_off_time(
    make_rig, settings
):
    rig = await make_rig(settings, contactor_min_off=1.0)
    client = await rig.client()
    station = await start_charging(rig, client)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(30):  # 30 toggles in 3 s: what a broken or hostile controller may send
        assert await write(client, 1, "set_current", 0 if i % 2 == 0 else 1600) is None
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)
    elapsed = loop.time() - started
    switches = [r.contactor for r in station.received if r.type.name == "SET_CONTACTOR"]
    closings = switches[1:].count(True)  # the first closing started the charging
    assert 1 <= closings <= elapsed / 1.0 + 1
    assert station.pwm == 26 and station.contactor  # the last write (16 A) is not lost
