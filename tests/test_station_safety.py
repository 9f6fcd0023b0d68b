"""Stations on a LAN that are not what they claim: hostile or broken peers against the bridge."""

import asyncio

from conftest import RawStation, eventually, idle_data

from openwb_modbus_evse.config import StationConfig
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.modbus.registers import REGISTER_MAP

ADDR = REGISTER_MAP.address
SERIAL = "10BA23AB50534D53302E3120FF162332"


async def raw_station(rig, serial: str = SERIAL, data: p.StationData | None = None) -> RawStation:
    """A hand-driven station that answered its first collect-data and is registered."""
    station = await RawStation.connect(rig.bridge.link.port, serial)
    assert (await station.next_request()).type is p.RequestType.COLLECT_DATA
    station.send(p.encode_data(data or idle_data(), 4))
    await eventually(lambda: serial in rig.bridge.link.sessions)
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
