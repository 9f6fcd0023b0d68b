"""More than nine stations: LP10 and up at the next Modbus unit IDs, over real TCP.

Eleven virtual stations take LP1..LP11; LP10 and LP11 are LP1 and LP2 of unit 2, read with a
pymodbus client, with mbpoll and with the status client, and written through unit 2.
"""

import asyncio
import subprocess

from click.testing import CliRunner
from conftest import eventually, require_tool

from openwb_modbus_evse.cli import main
from openwb_modbus_evse.config import LPS_PER_UNIT, MAX_LP
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP, lp_base
from openwb_modbus_evse.interfaces.modbus.server import ChargePointServer
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial
from openwb_modbus_evse.tools.status import read_status

ADDR = REGISTER_MAP.address
FAST_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)
STATIONS = 11
# Every virtual station connects from 127.0.0.1: allow all of them from one address.
MANY = {"evse_max_per_address": 16}


async def eleven(rig):
    stations = [await rig.station(i, FAST_VEHICLE) for i in range(1, STATIONS + 1)]
    await eventually(
        lambda: all(
            rig.point(s.serial) is not None and rig.point(s.serial).identity.lp == i
            for i, s in enumerate(stations, 1)
        )
    )
    return stations


async def read(client, unit, block):
    rr = await client.read_input_registers(lp_base(block), count=100, device_id=unit)
    assert not rr.isError(), (unit, block, rr)
    return REGISTER_MAP.decode(rr.registers)


def mbpoll(*args: str) -> str:
    done = subprocess.run(
        [require_tool("mbpoll"), "-m", "tcp", "-1", "-0", *args],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return done.stdout + done.stderr


def mbpoll_string(output: str) -> str:
    """The ASCII text of the registers mbpoll printed (two characters each, big-endian)."""
    words = [int(line.split(":")[1]) for line in output.splitlines() if line.startswith("[")]
    return b"".join((w & 0xFFFF).to_bytes(2, "big") for w in words).rstrip(b"\0").decode()


def test_max_lp_is_whole_unit_ids():
    assert MAX_LP % LPS_PER_UNIT == 0 and MAX_LP > LPS_PER_UNIT


async def test_lp10_and_lp11_are_served_at_unit_2(make_rig, settings):
    rig = await make_rig(settings, **MANY)
    stations = await eleven(rig)
    client = await rig.client()
    # Unit 1 keeps LP1..9 as before; unit 2 serves LP10 and LP11 in the blocks of LP1 and LP2.
    assert (await read(client, 1, 9))["serial_number"] == rig.serial_number(stations[8].serial)
    assert (await read(client, 2, 1))["serial_number"] == rig.serial_number(virtual_serial(10))
    assert (await read(client, 2, 2))["serial_number"] == rig.serial_number(virtual_serial(11))
    # Where no station is: exception 2 in a unit that has some, 11 for a unit that has none.
    rr = await client.read_input_registers(lp_base(3), count=100, device_id=2)
    assert rr.isError() and rr.exception_code == 2
    rr = await client.read_input_registers(lp_base(1), count=100, device_id=3)
    assert rr.isError() and rr.exception_code == 0x0B

    # A write through unit 2 drives LP10's station, and only it.
    rr = await client.write_register(ADDR(1, "set_current"), 1000, device_id=2)
    assert not rr.isError(), rr
    await stations[9].wait_for(lambda s: s.pwm == 16, timeout=3)  # 10 A
    assert rig.point(stations[9].serial).state.requested_ca == 1000
    assert rig.point(stations[0].serial).state.requested_ca == 0  # LP1 untouched
    # A bad write through unit 2 is refused and changes nothing.
    rr = await client.write_register(ADDR(1, "set_current"), 500, device_id=2)
    assert rr.isError() and rr.exception_code == 3
    assert rig.point(stations[9].serial).state.requested_ca == 1000


async def test_mbpoll_reads_and_writes_lp10_at_unit_2(make_rig, settings):
    rig = await make_rig(settings, **MANY)
    stations = await eleven(rig)
    port = str(rig.modbus_port)
    serial_at = str(ADDR(1, "serial_number"))
    for block, index in ((1, 10), (2, 11)):
        at = str(ADDR(block, "serial_number"))
        out = await asyncio.to_thread(
            mbpoll, "-a", "2", "-r", at, "-c", "10", "-t", "3", "-p", port, "127.0.0.1"
        )
        assert mbpoll_string(out) == rig.serial_number(virtual_serial(index)), out
    out = await asyncio.to_thread(
        mbpoll, "-a", "1", "-r", serial_at, "-c", "10", "-t", "3", "-p", port, "127.0.0.1"
    )
    assert mbpoll_string(out) == rig.serial_number(virtual_serial(1)), out
    out = await asyncio.to_thread(
        mbpoll, "-a", "2", "-r", str(ADDR(1, "set_current")), "-p", port, "127.0.0.1", "1200"
    )
    assert "Written 1 references" in out, out
    await stations[9].wait_for(lambda s: s.pwm == 20, timeout=3)


async def test_status_client_lists_lp10_and_lp11(make_rig, settings):
    rig = await make_rig(settings, **MANY)
    await eleven(rig)
    rows = await read_status("127.0.0.1", rig.modbus_port, unit=1)
    assert [r.lp for r in rows] == list(range(1, STATIONS + 1))
    assert [r.serial for r in rows] == [
        rig.serial_number(virtual_serial(i)) for i in range(1, STATIONS + 1)
    ]


async def test_unit_id_0_keeps_lp1_to_9_on_every_unit_id(make_rig, settings):
    rig = await make_rig(settings, unit_id=0)
    station = await rig.station(1, FAST_VEHICLE)
    client = await rig.client()
    for unit in (1, 2, 200):
        assert (await read(client, unit, 1))["serial_number"] == rig.serial_number(station.serial)
    rows = await read_status("127.0.0.1", rig.modbus_port, unit=0)
    assert [r.lp for r in rows] == [1]


def test_registers_command_shows_lp10_at_the_next_unit_id():
    lp10 = CliRunner().invoke(main, ["registers", "--lp", "10"])
    lp1 = CliRunner().invoke(main, ["registers", "--lp", "1"])
    assert lp10.exit_code == 0 and lp1.exit_code == 0
    first, rest = lp10.output.split("\n", 1)
    assert "unit ID unit_id + 1" in first and "LP1:" in first
    assert rest == lp1.output  # the same addresses as LP1
    assert "11071" not in lp10.output and "10171" in lp10.output


def test_unit_ids_stop_at_247():
    def server(unit_id):
        return ChargePointServer(lambda lp: None, lambda: 0.0, None, unit_id=unit_id)

    assert server(1).units() == range(1, 1 + MAX_LP // LPS_PER_UNIT)
    assert server(230).units() == range(230, 248)  # Modbus has no unit ID above 247
    assert server(0).units() == range(0, 1)  # every unit ID: LP1..9 only
