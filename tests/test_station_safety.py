"""Stations on a LAN that are not what they claim: hostile or broken peers against the bridge."""

import asyncio
import logging
import os
from dataclasses import replace

from conftest import RawStation, eventually, idle_data, metric

from openwb_modbus_evse.config import StationConfig
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import virtual_serial

ADDR = REGISTER_MAP.address
SERIAL = "10BA23AB50534D53302E3120FF162332"


async def raw_station(rig, serial: str = SERIAL, data: p.StationData | None = None) -> RawStation:
    """A hand-driven station that answered its first collect-data and is registered."""
    station = await RawStation.connect(rig.bridge.link.port, serial)
    assert (await station.next_request()).type is p.RequestType.COLLECT_DATA
    station.send(p.encode_data(data or idle_data(), 4))
    await eventually(lambda: serial in rig.bridge.link.sessions, interval=0.001)
    return station


# --- zombie session (finding 7) ------------------------------------------------------------


async def test_a_stray_pong_behind_a_data_response_leaves_no_zombie(make_rig, settings):
    station_cfg = StationConfig(serial=SERIAL, lp=1, phase_switch_command="true")
    rig = await make_rig(settings, station=(station_cfg,))
    client = await rig.client()
    station = await raw_station(rig, data=idle_data(pilot=p.Pilot.B_9V))
    point = rig.point(SERIAL)
    assert (await station.next_request()).type is p.RequestType.COLLECT_DATA
    station.send(p.encode_data(idle_data(pilot=p.Pilot.B_9V), 4) + p.pong())
    assert await station.closed_by_peer()
    await asyncio.sleep(0.2)
    assert SERIAL not in rig.bridge.link.sessions
    assert not point.state.connected
    assert not (await client.write_register(ADDR(1, "phase_target"), 1, device_id=1)).isError()
    for name, value in (("cp_interruption", 5), ("phase_switch_trigger", 1)):
        rr = await client.write_register(ADDR(1, name), value, device_id=1)
        assert rr.isError() and rr.exception_code == 11, (name, rr)  # offline


async def answer(station: RawStation, data: p.StationData, count: int) -> list[p.Request]:
    """Answer ``count`` requests like a station that reports ``data`` and obeys nothing."""
    requests = []
    for _ in range(count):
        request = await station.next_request()
        requests.append(request)
        if request.type is p.RequestType.COLLECT_DATA:
            station.send(p.encode_data(data, 4))
        elif request.type is p.RequestType.SET_PWM:
            station.send(p.pwm_ack())
        elif request.type is p.RequestType.SET_CONTACTOR:
            station.send(p.contactor_ack())
    return requests


# --- plausibility (finding 5) --------------------------------------------------------------


async def test_impossible_measurements_add_no_energy_and_open_the_contactor(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    top = 2**32 - 1
    forged = idle_data(
        contactor=True, pilot=p.Pilot.C_6V, voltages_mv=(top,) * 3, currents_ma=(top,) * 3
    )
    station = await raw_station(rig, data=forged)
    requests = await answer(station, forged, 8)
    point = rig.point(SERIAL)
    await eventually(
        lambda: (
            point.implausible_reports
            == 1 + sum(r.type is p.RequestType.COLLECT_DATA for r in requests)
        )
    )
    assert point.implausible_reports >= 4
    assert point.energy.wh == 0
    assert p.Request(p.RequestType.SET_CONTACTOR, contactor=False) in requests  # a fault: open
    rr = await client.read_input_registers(ADDR(1, "power"), count=100, device_id=1)
    values = REGISTER_MAP.decode(rr.registers)
    assert values["energy_imported"] == 0
    # no data: nothing for clients to add up (0), the voltages unknown (-1)
    assert values["power"] == 0 and values["voltage_l1"] is None
    labels = {"lp": "1", "serial": rig.point(SERIAL).identity.public_id, "name": "LP1"}
    assert metric(rig.bridge, "openwb_modbus_evse_implausible_reports_total", **labels) >= 4
    await station.close()


# --- unknown stations (finding 3) ----------------------------------------------------------


async def one_shot(rig, serial: str) -> None:
    """Connect as a station, answer the first collect-data, leave."""
    station = await raw_station(rig, serial)
    await station.close()
    await eventually(lambda: serial not in rig.bridge.link.sessions, interval=0.001)


def random_serial() -> str:
    return os.urandom(16).hex().upper()


async def test_one_shot_connections_claim_no_lp(make_rig, settings):
    rig = await make_rig(settings)
    for _ in range(9):
        await one_shot(rig, random_serial())
    assert rig.bridge.registry.store.lp_assignments() == {}
    assert rig.bridge.registry.points() == []
    real = await rig.station(1)
    assert rig.point(real.serial).identity.lp == 1  # served at once
    store = rig.bridge.registry.store
    await eventually(lambda: store.lp_assignments() == {real.serial: 1}, timeout=3)
    await real.stop()
    await eventually(lambda: real.serial not in rig.bridge.link.sessions)
    assert rig.bridge.registry.at(1) is rig.point(real.serial)  # remembered: LP1 stays
    await rig.close()
    # Across a restart, an LP is restored only for a station that a controller has charged
    # through or an operator confirmed: this one gets the lowest free LP again when it comes.
    again = await make_rig(settings)
    assert again.bridge.registry.at(1) is None
    back = await again.station(1)
    assert again.point(back.serial).identity.lp == 1


async def test_hundreds_of_random_serials_leave_nothing_behind(make_rig, settings, caplog):
    caplog.set_level(logging.INFO, logger="openwb_modbus_evse.registry")
    rig = await make_rig(settings)
    for _ in range(300):
        await one_shot(rig, random_serial())
    bridge = rig.bridge
    # The last one is released by its probation task, just after its session ended.
    await eventually(lambda: bridge.registry.points() == [])
    assert bridge.registry.store.lp_assignments() == {}
    assert bridge.registry.store.energy_wh() == {}
    exposition = bridge.metrics.exposition(bridge.snapshot()).decode()
    assert "serial=" not in exposition  # no series left for any of them
    newcomer_lines = [r for r in caplog.records if r.name == "openwb_modbus_evse.registry"]
    assert 20 <= len(newcomer_lines) <= 22  # a burst of 20, then one every 10 s


async def test_hold_polls_unknown_stations_safely_but_serves_only_known_ones(make_rig, settings):
    known = virtual_serial(2)
    rig = await make_rig(settings, unknown_stations="hold", known_stations=(known,))
    client = await rig.client()
    charging = idle_data(contactor=True, pilot=p.Pilot.C_6V, pwm=26, currents_ma=(16_000,) * 3)
    stranger = await raw_station(rig, data=charging)
    requests = await answer(stranger, replace(charging, pwm=100), 4)
    assert p.Request(p.RequestType.SET_PWM, pwm=100) in requests  # stopped the safe way
    point = rig.point(SERIAL)
    assert point.identity.lp is None and rig.bridge.registry.at(1) is None
    rr = await client.read_input_registers(ADDR(1, "power"), count=10, device_id=1)
    assert rr.isError() and rr.exception_code == 2  # not served
    friend = await rig.station(2)
    assert rig.point(friend.serial).identity.lp == 1
    assert rig.bridge.registry.store.lp_assignments() == {known: 1}  # known: remembered at once
    await stranger.close()
    await eventually(lambda: rig.bridge.registry.get(SERIAL) is None)


# --- LP move ---------------------------------------------------------------------------------


async def test_a_moved_station_drops_what_was_written_for_its_old_lp(make_rig, settings):
    from openwb_modbus_evse.tools.simulator import VehicleConfig

    rig = await make_rig(settings)
    bridge = rig.bridge
    client = await rig.client()
    station = await rig.station(1, VehicleConfig(plug_in_after=None))
    point = rig.point(station.serial)
    assert point.identity.lp == 1
    rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    rr = await client.write_register(ADDR(1, "heartbeat"), 0, device_id=1)
    assert not rr.isError()
    assert point.state.requested_ca == 1600 and not point.state.enforce_heartbeat
    # As with an openWB tree per LP: the new LP's controller has no heartbeat (yet).
    beat = bridge.modbus_heartbeat
    bridge.control.resolve_heartbeat("modbus", lambda p: None if p.identity.lp == 4 else beat)
    assert not point.state.heartbeat_lapsed

    bridge.registry.move(station.serial, 4)

    assert point.identity.lp == 4
    assert point.state.requested_ca == 0 and point.state.enforce_heartbeat
    assert point.state.heartbeat_lapsed


async def test_a_moved_station_keeps_its_configured_name(make_rig, settings):
    from openwb_modbus_evse.tools.simulator import VehicleConfig

    named = StationConfig(serial=virtual_serial(1), name="Garage")
    rig = await make_rig(settings, station=(named,))
    station = await rig.station(1, VehicleConfig(plug_in_after=None))
    point = rig.point(station.serial)
    assert point.identity.lp == 1 and point.name == "Garage"
    rig.bridge.registry.move(station.serial, 4)
    assert point.identity.lp == 4 and point.name == "Garage"


async def test_stations_that_connect_and_close_in_a_loop_cost_a_few_log_lines(
    make_rig, settings, caplog
):
    caplog.set_level(logging.INFO)
    rig = await make_rig(settings)
    serial = random_serial()
    for _ in range(60):
        await one_shot(rig, serial)
    lines = [r for r in caplog.records if "connected from" in r.getMessage()]
    lines += [r for r in caplog.records if "session closed" in r.getMessage()]
    assert len(lines) <= 20 + 2  # a burst, then one a second
    left_out = "openwb_modbus_evse_log_lines_left_out_total"
    assert metric(rig.bridge, left_out, kind="station_session") >= 100


async def test_stations_that_no_controller_drives_give_way_and_are_not_restored(
    make_rig, settings, monkeypatch
):
    """Eight fake stations that answer polls take LP2..9: a real station still gets an LP, and
    after a restart the fakes hold none (issue 19: LP squatting)."""
    from test_control import FAST_VEHICLE, write

    from openwb_modbus_evse import registry

    monkeypatch.setattr(registry, "MAX_LP", 9)  # nine LPs to take, not 243
    settings = replace(settings, evse_max_per_address=16)  # every station is on 127.0.0.1 here
    rig = await make_rig(settings)
    client = await rig.client()
    real = await rig.station(1, FAST_VEHICLE)
    await real.wait_for(lambda s: s.plugged)
    assert await write(client, 1, "set_current", 1600) is None
    await real.wait_for(lambda s: s.contactor)  # driven: LP1 is its own for good
    fakes = [await rig.station(i) for i in range(2, 10)]
    store = rig.bridge.registry.store
    await eventually(lambda: len(store.lp_assignments()) == 9, timeout=5)  # probation passed
    newcomer = await rig.station(10)
    lp = rig.point(newcomer.serial).identity.lp
    assert lp is not None and 2 <= lp <= 9  # a never-driven fake gave way
    assert rig.point(real.serial).identity.lp == 1
    for fake in fakes:
        await fake.stop()
    await rig.close()
    again = await make_rig(settings)
    assert again.bridge.registry.at(1) is not None  # the driven one is restored
    assert [again.bridge.registry.at(n) for n in range(2, 10)] == [None] * 8
