"""The status client against a real Modbus TCP server that serves blocks like a real openWB."""

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from conftest import free_port
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from openwb_modbus_evse.config import LPS_PER_UNIT
from openwb_modbus_evse.interfaces.modbus.registers import LP_STRIDE, REGISTER_MAP, lp_base
from openwb_modbus_evse.tools.status import (
    LpStatus,
    StatusError,
    format_table,
    read_status,
    run,
    to_json,
)

LP1 = {
    "hardware_type": 1,
    "serial_number": "1234567890ABCDEF",
    "power": 11040,
    "energy_imported": 123456,
    "voltage_l1": 230.1,
    "voltage_l2": 229.8,
    "voltage_l3": 231.0,
    "current_l1": 16.0,
    "current_l2": 15.95,
    "current_l3": 16.05,
    "plugged": 1,
    "charging": 1,
    "offered_current": 16.0,
}
# A Pro with invalid (-1) measurements and no serial.
LP3 = {
    "hardware_type": 2,
    "power": None,
    "energy_imported": None,
    "voltage_l1": 230.0,
    "voltage_l2": None,
    "voltage_l3": 0,
    "current_l1": 6.25,
    "current_l2": 0,
    "current_l3": None,
    "plugged": 1,
    "charging": 0,
    "offered_current": 6.25,
}
EXPECTED_LP1 = LpStatus(
    lp=1,
    serial="1234567890ABCDEF",
    plugged=True,
    charging=True,
    offered_a=16.0,
    voltages_v=(230.1, 229.8, 231.0),
    currents_a=(16.0, 15.95, 16.05),
    power_w=11040,
    energy_wh=123456,
)
EXPECTED_LP3 = LpStatus(
    lp=3,
    serial="",
    plugged=True,
    charging=False,
    offered_a=6.25,
    voltages_v=(230.0, None, 0.0),
    currents_a=(6.25, 0.0, None),
    power_w=None,
    energy_wh=None,
)


def _registers(blocks: dict[int, dict]) -> list[int]:
    """LP1..LP9 as one register array; LPs not given are all zeros, as a real openWB serves them."""
    registers = []
    for lp in range(1, LPS_PER_UNIT + 1):
        registers += REGISTER_MAP.encode(blocks[lp]) if lp in blocks else [0] * LP_STRIDE
    return registers


@asynccontextmanager
async def serving(device: SimDevice) -> AsyncIterator[int]:
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        yield server.transport.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()


def _openwb(blocks: dict[int, dict], action=None) -> SimDevice:
    data = SimData(address=lp_base(1), values=_registers(blocks), datatype=DataType.REGISTERS)
    return SimDevice(id=1, simdata=[data], action=action)


@pytest.fixture
async def port():
    async with serving(_openwb({1: LP1, 3: LP3})) as port:
        yield port


def _closed_port() -> int:
    return free_port()  # nobody else in this run is given it, so it stays closed


class StopAfter(io.StringIO):
    """An output that presses Ctrl-C on write number ``writes + 1``."""

    def __init__(self, writes: int, tty: bool = False) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.limit = writes
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        if len(self.writes) == self.limit:
            raise KeyboardInterrupt
        self.writes.append(text)
        return super().write(text)


async def test_finds_the_present_lps_with_their_values(port):
    rows = await read_status("127.0.0.1", port)
    assert rows == [EXPECTED_LP1, EXPECTED_LP3]  # LP2 and LP4..9 are zeros: not present


async def test_table_has_aligned_columns_and_dashes_for_invalid_values():
    lines = format_table([EXPECTED_LP1, EXPECTED_LP3]).splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:4] == ["LP", "serial", "plugged", "charging"]
    assert lines[1].split() == [
        "LP1",
        "1234567890ABCDEF",
        "yes",
        "yes",
        "16.00",
        "230.1",
        "229.8",
        "231.0",
        "16.00",
        "15.95",
        "16.05",
        "11040",
        "123.456",
        "-",
    ]
    assert lines[2].split() == [
        "LP3",
        "-",
        "yes",
        "no",
        "6.25",
        "230.0",
        "-",
        "0.0",
        "6.25",
        "0.00",
        "-",
        "-",
        "-",
        "-",
    ]
    # Numbers are right-aligned under their headers; the controller is left-aligned after them.
    column = lines[0].index("controller")
    assert len({len(line[:column]) for line in lines}) == 1
    assert all(line[column:] in ("controller", "-") for line in lines)
    power_end = lines[0].index("power W") + len("power W")
    assert lines[1][:power_end].endswith("11040")
    assert lines[2][:power_end].endswith(" -")


def test_table_says_so_when_no_charge_point_answers():
    assert "no charge points answer" in format_table([])


def test_json_round_trips_with_numbers_and_nulls():
    data = json.loads(to_json([EXPECTED_LP1, EXPECTED_LP3]))
    assert data == [
        {
            "lp": 1,
            "serial": "1234567890ABCDEF",
            "plugged": True,
            "charging": True,
            "offered_a": 16.0,
            "voltages_v": [230.1, 229.8, 231.0],
            "currents_a": [16.0, 15.95, 16.05],
            "power_w": 11040,
            "energy_wh": 123456,
            "controller": None,
        },
        {
            "lp": 3,
            "serial": "",
            "plugged": True,
            "charging": False,
            "offered_a": 6.25,
            "voltages_v": [230.0, None, 0.0],
            "currents_a": [6.25, 0.0, None],
            "power_w": None,
            "energy_wh": None,
            "controller": None,
        },
    ]
    assert isinstance(data[0]["power_w"], int) and isinstance(data[0]["energy_wh"], int)
    assert json.loads(to_json([])) == []


async def test_run_prints_the_table_once(port):
    out = io.StringIO()
    rc = await asyncio.to_thread(run, "127.0.0.1", port, 1, out=out)
    assert rc == 0
    assert out.getvalue() == format_table([EXPECTED_LP1, EXPECTED_LP3]) + "\n"


async def test_run_prints_json(port):
    out = io.StringIO()
    rc = await asyncio.to_thread(run, "127.0.0.1", port, 1, as_json=True, out=out)
    assert rc == 0
    assert [row["lp"] for row in json.loads(out.getvalue())] == [1, 3]


async def test_wrong_unit_finds_nothing(port):
    # pymodbus answers an unknown unit with an exception for every LP.
    assert await read_status("127.0.0.1", port, unit=7) == []


async def test_unreachable_host_is_one_error_line_and_exit_code_1(capsys, caplog):
    closed = _closed_port()
    out = io.StringIO()
    level = logging.getLogger("pymodbus").level
    started = time.monotonic()
    rc = await asyncio.to_thread(run, "127.0.0.1", closed, 1, out=out)
    assert time.monotonic() - started < 3.0  # refused at once, not timeout x 9
    assert rc == 1
    assert out.getvalue() == ""
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: cannot reach 127.0.0.1:{closed}: Connection refused"]
    assert not [r for r in caplog.records if r.name.startswith("pymodbus")]
    assert logging.getLogger("pymodbus").level == level


async def test_read_status_raises_for_a_closed_port():
    with pytest.raises(StatusError, match=r"^cannot reach 127\.0\.0\.1:\d+: "):
        await read_status("127.0.0.1", _closed_port(), timeout=1.0)


async def test_a_server_that_never_answers_fails_after_one_timeout():
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept requests, answer none
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    silent = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(StatusError, match=r"no answer from unit 1 within 0\.2 s"):
            await read_status("127.0.0.1", silent, timeout=0.2)
        assert time.monotonic() - started < 0.6  # one try, no retries
    finally:
        server.close()


async def test_watch_on_a_pipe_prints_successive_tables(port):
    out = StopAfter(writes=2)
    rc = await asyncio.to_thread(run, "127.0.0.1", port, 1, watch=True, interval=0.01, out=out)
    assert rc == 0
    assert len(out.writes) == 2
    text = out.getvalue()
    assert "\x1b" not in text
    assert text.count("LP1  1234567890ABCDEF") == 2
    assert out.writes[1].startswith("\n")  # a blank line between the tables
    assert f"127.0.0.1:{port} unit 1" in out.writes[0]


async def test_watch_on_a_terminal_redraws_in_place(port):
    out = StopAfter(writes=2, tty=True)
    rc = await asyncio.to_thread(run, "127.0.0.1", port, 1, watch=True, interval=0.01, out=out)
    assert rc == 0
    assert len(out.writes) == 2
    for write in out.writes:
        assert write.startswith("\x1b[H\x1b[2J")
        assert "LP3  -" in write


async def test_watch_json_is_one_document_per_line(port):
    out = StopAfter(writes=2, tty=True)
    rc = await asyncio.to_thread(
        run, "127.0.0.1", port, 1, watch=True, interval=0.01, as_json=True, out=out
    )
    assert rc == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert all([row["lp"] for row in json.loads(line)] == [1, 3] for line in lines)


async def test_an_lp_answering_with_an_exception_is_absent():
    requested = []

    async def refuse_lp2(function_code, start_address, address, count, registers, set_values):
        requested.append(address)
        if lp_base(2) <= address < lp_base(3):
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    # LP2 holds a valid charge point: only the exception can make it absent.
    device = _openwb({1: LP1, 2: LP1, 3: LP3}, action=refuse_lp2)
    async with serving(device) as port:
        rows = await read_status("127.0.0.1", port)
    assert lp_base(2) in requested
    assert [row.lp for row in rows] == [1, 3]
    assert rows[1] == EXPECTED_LP3  # the connection stays usable after the exception
