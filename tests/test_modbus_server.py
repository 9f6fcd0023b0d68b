"""The Modbus server over real TCP: virtual station <-> bridge <-> pymodbus client and mbpoll."""

import asyncio
import re
import struct
import subprocess

import pytest
from conftest import eventually, require_tool, station_config

from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP, lp_base
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

ADDR = REGISTER_MAP.address  # (lp, name) -> address, from register_map.csv
LP1 = lp_base(1)


def value(block: list[int], name: str):
    return REGISTER_MAP.decode(block)[name]


async def read_block(client, lp=1, fc=4):
    read = client.read_input_registers if fc == 4 else client.read_holding_registers
    rr = await read(lp_base(lp), count=100, device_id=1)
    assert not rr.isError(), rr
    return rr.registers


@pytest.fixture
async def rig(make_rig, settings):
    return await make_rig(settings)


async def charging_rig(rig, amps=16, **vehicle):
    """LP1 with a vehicle charging at ``amps``."""
    station = await rig.station(1, VehicleConfig(plug_in_after=0.0, reaction_s=0.05, **vehicle))
    client = await rig.client()
    await station.wait_for(lambda s: s.plugged)
    rr = await client.write_register(ADDR(1, "set_current"), amps * 100, device_id=1)
    assert not rr.isError()
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    return station, client


async def test_block_read_shows_the_station_and_fc3_equals_fc4(rig):
    station, client = await charging_rig(rig)
    point = rig.point(station.serial)
    await eventually(lambda: point.state.data.currents_ma[0] == 15_600)
    block = await read_block(client, fc=4)
    values = REGISTER_MAP.decode(block)
    assert values["voltage_l1"] == 230.0 and values["voltage_l3"] == 230.0
    assert values["current_l1"] == 15.6 and values["current_l2"] == 15.6
    assert values["power"] == round(3 * 230 * 15.6)
    assert values["power_l1"] == round(230 * 15.6)
    assert values["plugged"] == 1 and values["charging"] == 1
    assert values["offered_current"] == 15.6  # 26 % PWM, never above the 16 A written
    assert values["hardware_type"] == 1
    assert values["serial_number"] == rig.serial_number(station.serial)
    assert values["rfid_tag"] == "" and values["soc"] == 0
    assert block[REGISTER_MAP["set_current"].offset] == 0  # write-only reads as 0
    assert block[50:60] == (await read_block(client, fc=3))[50:60]
    assert await read_block(client, fc=3) == await read_block(client, fc=4)


async def test_lp_without_a_station_and_addresses_outside_the_blocks_are_exception_2(rig):
    await rig.station(1)
    client = await rig.client()
    for address, count in ((lp_base(2), 1), (lp_base(1) + 90, 20), (10000, 10), (11000, 1)):
        rr = await client.read_input_registers(address, count=count, device_id=1)
        assert rr.isError() and rr.exception_code == 2, (address, rr)


async def test_other_function_codes_get_exception_1(rig):
    await rig.station(1)
    client = await rig.client()
    for call in (
        client.read_coils(LP1, count=1, device_id=1),
        client.read_discrete_inputs(LP1, count=1, device_id=1),
        client.write_coil(LP1, True, device_id=1),
        client.mask_write_register(address=ADDR(1, "set_current"), device_id=1),
        client.readwrite_registers(
            read_address=LP1,
            read_count=1,
            write_address=ADDR(1, "set_current"),
            values=[1600],
            device_id=1,
        ),
    ):
        rr = await call
        assert rr.isError() and rr.exception_code == 1, rr
    # A function code pymodbus does not know at all (raw frame: report server ID, 0x11).
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.modbus_port)
    writer.write(struct.pack(">HHHBB", 7, 0, 2, 1, 0x11))
    reply = await asyncio.wait_for(reader.readexactly(9), 3)
    assert reply[7:] == bytes([0x91, 1])
    writer.close()


async def test_unknown_unit_id_gets_gateway_exception(rig):
    await rig.station(1)
    client = await rig.client()
    rr = await client.read_input_registers(LP1, count=10, device_id=7)
    assert rr.isError() and rr.exception_code == 0x0B


async def test_unit_id_0_answers_every_unit_id(make_rig, settings):
    rig = await make_rig(settings, unit_id=0)
    await rig.station(1)
    client = await rig.client()
    for unit in (1, 7, 247):
        rr = await client.read_input_registers(LP1, count=100, device_id=unit)
        assert not rr.isError(), (unit, rr)
        assert value(rr.registers, "hardware_type") == 1


BAD_WRITES = [
    # (register, values, exception code)
    ("set_current", [500], 3),
    ("set_current", [3201], 3),
    ("set_current", [0xFFFF], 3),  # -1
    ("phase_target", [2], 3),
    ("phase_target", [1], 3),  # a 3-phase station without a phase_switch_command
    ("phase_switch_trigger", [0], 3),
    ("heartbeat", [2], 3),
    ("cp_interruption", [0], 3),
    ("cp_interruption", [61], 3),
    ("reset_rfid", [0], 3),
    ("force_update", [1], 2),
    ("power", [1], 2),  # read-only
    ("serial_number", [0x4142], 2),
]


@pytest.mark.parametrize(("name", "values", "code"), BAD_WRITES)
async def test_bad_writes_get_their_exception_and_change_nothing(rig, name, values, code):
    station, client = await charging_rig(rig, amps=10)
    point = rig.point(station.serial)
    before_state = point.state.requested_ca, point.state.enforce_heartbeat, point.state.sequence
    before_cmds = len(station.received)
    address = ADDR(1, name)
    if len(values) == 1:
        rr = await client.write_register(address, values[0], device_id=1)
    else:
        rr = await client.write_registers(address, values, device_id=1)
    assert rr.isError() and rr.exception_code == code
    after_state = point.state.requested_ca, point.state.enforce_heartbeat, point.state.sequence
    assert after_state == before_state
    await asyncio.sleep(0.1)
    assert all(r.type.name == "COLLECT_DATA" for r in station.received[before_cmds:])
    assert station.pwm == 16 and station.contactor  # still charging at 10 A


@pytest.mark.parametrize(
    ("start", "values", "code"),
    [
        ("set_current", [800, 1], 2),  # 10172 is not writable
        ("phase_target", [3, 0], 3),  # valid target, bad trigger
        ("set_current", [800] + [0] * 8 + [3], 2),  # 10171..10180 covers unmapped registers
    ],
)
async def test_multi_register_writes_are_all_or_nothing(rig, start, values, code):
    station, client = await charging_rig(rig, amps=10)
    point = rig.point(station.serial)
    before = point.state
    rr = await client.write_registers(ADDR(1, start), values, device_id=1)
    assert rr.isError() and rr.exception_code == code
    assert point.state.requested_ca == before.requested_ca == 1000
    assert point.state.phase_target == before.phase_target


async def test_good_writes_are_echoed_and_applied(rig):
    station, client = await charging_rig(rig, amps=16)
    rr = await client.write_register(ADDR(1, "set_current"), 1000, device_id=1)
    assert not rr.isError() and rr.registers == [1000]
    await station.wait_for(lambda s: s.pwm == 16)
    rr = await client.write_registers(ADDR(1, "phase_target"), [3, 1], device_id=1)
    assert not rr.isError()  # equal to the wiring: accepted, nothing to do
    for name, v in (("heartbeat", 0), ("heartbeat", 1), ("reset_rfid", 1)):
        rr = await client.write_register(ADDR(1, name), v, device_id=1)
        assert not rr.isError(), name
    assert station.contactor


async def test_evcc_access_pattern_end_to_end(rig):
    """What evcc's openwb-2.0 charger does, in its order, with its function codes."""
    vehicle = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)
    station = await rig.station(1, vehicle)
    client = await rig.client()
    await station.wait_for(lambda s: s.plugged)

    async def fc4(name, count):
        rr = await client.read_input_registers(ADDR(1, name), count=count, device_id=1)
        assert not rr.isError(), (name, rr)
        return rr.registers

    async def fc6(name, v):
        rr = await client.write_register(ADDR(1, name), v, device_id=1)
        assert not rr.isError(), (name, rr)

    await eventually(lambda: rig.point(station.serial).state.data.pilot.plugged)
    assert (await fc4("charging", 1)) == [0] and (await fc4("plugged", 1)) == [1]  # state B
    await fc6("set_current", 1625)  # enable at 16.25 A (evcc allows fractional amps)
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    await asyncio.sleep(0.6)  # one poll
    assert (await fc4("charging", 1)) == [1]  # state C
    power = struct.unpack(">i", struct.pack(">HH", *await fc4("power", 2)))[0]
    energy = struct.unpack(">I", struct.pack(">HH", *await fc4("energy_imported", 2)))[0]
    assert power == round(3 * 230 * 16.2) and 0 <= energy < 1000
    assert [v / 100 for v in await fc4("current_l1", 3)] == [16.2, 16.2, 16.2]
    assert [v / 100 for v in await fc4("voltage_l1", 3)] == [230.0, 230.0, 230.0]
    assert await fc4("rfid_tag", 10) == [0] * 10  # "no RFID"
    await fc6("phase_target", 3)
    await fc6("phase_switch_trigger", 1)
    await fc6("cp_interruption", 1)  # wake-up: stops, state F for 1 s, resumes
    await station.wait_for(lambda s: s.pwm == 0, timeout=5)
    await station.wait_for(lambda s: s.pwm == 27 and s.contactor, timeout=8)
    await fc6("set_current", 0)  # disable
    await station.wait_for(lambda s: not s.contactor and s.pwm == 100, timeout=5)


async def test_configured_lp_and_remembered_lp_across_restarts(make_rig, settings):
    configured = station_config(5, lp=3, name="garage", serial_number="WB-GARAGE")
    rig = await make_rig(settings, station=(configured,))
    await rig.station(5)
    six = await rig.station(6)  # not configured: lowest free LP, remembered once it charged
    client = await rig.client()
    await six.wait_for(lambda s: s.plugged)
    assert not (await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)).isError()
    await six.wait_for(lambda s: s.contactor)
    await eventually(lambda: virtual_serial(6) in rig.bridge.registry.store.lp_assignments())
    assert value(await read_block(client, 3), "serial_number") == "WB-GARAGE"
    assert value(await read_block(client, 1), "serial_number") == rig.serial_number(
        virtual_serial(6)
    )
    await rig.close()

    rig2 = await make_rig(settings, station=(configured,))
    client = await rig2.client()
    # Before the station reconnects, its remembered LP is served with "no data" values; the
    # plug state is held across the restart (the station's last report was kept), so that a
    # controller's charging session survives a restart of the service.
    block = await read_block(client, 1)
    assert value(block, "voltage_l1") is None and value(block, "power") == 0
    assert value(block, "plugged") == 1
    await rig2.station(7)  # a new station does not take LP1
    assert rig2.point(virtual_serial(7)).identity.lp == 2


def mbpoll(*args: str) -> str:
    tool = require_tool("mbpoll")
    done = subprocess.run(
        [tool, "-m", "tcp", "-a", "1", "-1", "-0", *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return done.stdout + done.stderr


def mbpoll_values(output: str) -> dict[int, int]:
    return {int(a): int(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(-?\d+)", output, re.M)}


async def test_mbpoll_reads_what_pymodbus_reads_and_writes_the_current(rig):
    station, client = await charging_rig(rig, amps=16)
    await asyncio.sleep(0.6)
    port = str(rig.modbus_port)
    for table in ("3", "4"):  # input and holding registers
        out = await asyncio.to_thread(
            mbpoll, "-r", str(LP1), "-c", "60", "-t", table, "-p", port, "127.0.0.1"
        )
        got = mbpoll_values(out)
        expected = (await read_block(client))[:60]
        assert [got[LP1 + i] & 0xFFFF for i in range(60)] == expected, out
    # A 32-bit read of the power register, big-endian words as openWB serves them.
    out = await asyncio.to_thread(
        mbpoll, "-r", str(ADDR(1, "power")), "-t", "3:int", "-B", "-p", port, "127.0.0.1"
    )
    assert mbpoll_values(out)[ADDR(1, "power")] == round(3 * 230 * 15.6)
    out = await asyncio.to_thread(
        mbpoll, "-r", str(ADDR(1, "set_current")), "-t", "4", "-p", port, "127.0.0.1", "1000"
    )
    assert "Written 1 references" in out
    await station.wait_for(lambda s: s.pwm == 16)
    out = await asyncio.to_thread(
        mbpoll, "-r", str(ADDR(1, "set_current")), "-t", "4", "-p", port, "127.0.0.1", "400"
    )
    assert "Illegal data value" in out
    assert rig.point(station.serial).state.requested_ca == 1000


# --- conformance: raw requests over a real socket ----------------------------------------------


async def raw_request(port: int, pdu: bytes, unit: int = 1, tid: int = 9) -> bytes:
    """Send one MBAP frame with ``pdu``; the response PDU (function code first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
        header = await asyncio.wait_for(reader.readexactly(7), 3)
        got_tid, protocol, length, got_unit = struct.unpack(">HHHB", header)
        assert (got_tid, protocol, got_unit) == (tid, 0, unit)
        return await asyncio.wait_for(reader.readexactly(length - 1), 3)
    finally:
        writer.close()


SET_CURRENT = ADDR(1, "set_current")
MALFORMED = [
    # (request PDU, expected response PDU)
    (struct.pack(">BHH", 4, LP1, 0), b"\x84\x03"),  # count 0
    (struct.pack(">BHH", 4, LP1, 126), b"\x84\x03"),  # count above 125
    (struct.pack(">BHH", 3, LP1, 126), b"\x83\x03"),
    (struct.pack(">BHH", 3, LP1, 0xFFFF), b"\x83\x03"),
    (struct.pack(">BH", 3, LP1), b"\x83\x03"),  # truncated: no count
    (b"\x04", b"\x84\x03"),  # function code only
    (struct.pack(">BH", 6, SET_CURRENT), b"\x86\x03"),  # truncated: no value
    (struct.pack(">BHHB", 16, SET_CURRENT, 0, 0), b"\x90\x03"),  # count 0
    (struct.pack(">BHHBH", 16, SET_CURRENT, 124, 2, 800), b"\x90\x03"),  # count above 123
    (struct.pack(">BHHBH", 16, SET_CURRENT, 1, 4, 800), b"\x90\x03"),  # byte count != 2 * count
    (struct.pack(">BHHBB", 16, SET_CURRENT, 1, 2, 3), b"\x90\x03"),  # truncated value
    (b"\x80\x00", b"\x80\x01"),  # function codes 0x80.. are never requests
    (b"\x81\x00\x00", b"\x81\x01"),
    (b"\xff", b"\xff\x01"),
]


@pytest.mark.parametrize(("request_pdu", "expected"), MALFORMED)
async def test_malformed_requests_get_their_function_code_and_change_nothing(
    rig, request_pdu, expected
):
    station, _ = await charging_rig(rig, amps=10)
    point = rig.point(station.serial)
    before = point.state.requested_ca, point.state.sequence, len(station.received)
    assert await raw_request(rig.modbus_port, request_pdu) == expected
    await asyncio.sleep(0.1)
    assert (point.state.requested_ca, point.state.sequence) == before[:2]
    assert all(r.type.name == "COLLECT_DATA" for r in station.received[before[2] :])
    assert station.pwm == 16 and station.contactor


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">HHHB", 1, 0, 0, 1),  # length 0
        struct.pack(">HHHB", 1, 0, 1, 1),  # length 1: a unit ID without a PDU
        struct.pack(">HHHB", 1, 1, 6, 1) + struct.pack(">BHH", 4, LP1, 1),  # protocol ID 1
        struct.pack(">HHHB", 1, 0, 300, 1) + b"\x04" * 40,  # longer than any Modbus frame
    ],
)
async def test_a_broken_mbap_header_drops_the_connection_and_nothing_else(rig, header):
    await rig.station(1)
    client = await rig.client()
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.modbus_port)
    writer.write(header)
    assert await asyncio.wait_for(reader.read(100), 3) == b""  # closed by the server, silently
    writer.close()
    await read_block(client)  # other clients go on


async def test_many_pipelined_requests_in_one_segment_are_all_answered(rig):
    await rig.station(1)
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.modbus_port)
    # 60 reads of 2 registers (12 bytes each, 720 bytes) in one write: pymodbus alone drops a
    # receive buffer over 516 bytes and answers none of them.
    writer.write(b"".join(struct.pack(">HHHBBHH", tid, 0, 6, 1, 4, LP1, 2) for tid in range(60)))
    answered = set()
    for _ in range(60):
        header = await asyncio.wait_for(reader.readexactly(7), 3)
        tid, _, length, _ = struct.unpack(">HHHB", header)
        body = await reader.readexactly(length - 1)
        assert body[0] == 4  # no exception
        answered.add(tid)
    assert answered == set(range(60))
    writer.close()


async def test_garbage_that_cannot_be_framed_closes_the_connection(rig):
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.modbus_port)
    writer.write(b"\x00\x01" + b"\xff" * 4094)  # 4 KiB: no MBAP header fits
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, nothing answered
    writer.close()
