"""Bounded listeners and access control: connection caps, idle timeout, allow lists, fd budget."""

import asyncio
import resource
import socket
import struct
import subprocess
import sys

import pytest
from conftest import RawStation, eventually, free_port, station_config
from pymodbus.client import AsyncModbusTcpClient

from openwb_modbus_evse.config import ConfigError, build
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP, lp_base
from openwb_modbus_evse.limits import (
    ConnectionLimiter,
    Refusal,
    address_in,
    host_of,
    parse_networks,
    raise_fd_limit,
)
from openwb_modbus_evse.tools.simulator import VehicleConfig

SET_CURRENT = REGISTER_MAP.address(1, "set_current")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refused(bridge, listener: str, reason: str) -> float:
    value = bridge.metrics.registry.get_sample_value(
        "openwb_modbus_evse_connections_refused_total", {"listener": listener, "reason": reason}
    )
    return value or 0.0


async def closed_at_once(port: int) -> bool:
    """Connect; True if the server closes the connection without a word."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(100), 2) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def modbus_client(port: int) -> AsyncModbusTcpClient:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await client.connect()
    return client


# --- the limiter on its own -------------------------------------------------------------------


def _closer(closed: list[str], name: str):
    return lambda: closed.append(name)


def test_limiter_caps_total_and_per_address_and_releases():
    clock = Clock()
    closed: list[str] = []
    limiter = ConnectionLimiter("modbus", max_total=3, max_per_address=2, clock=clock)
    a1 = limiter.admit("10.0.0.1", _closer(closed, "a1"))
    a2 = limiter.admit("10.0.0.1", _closer(closed, "a2"))
    assert a1 is not None and a2 is not None
    a1.protect()
    a2.protect()
    assert limiter.admit("10.0.0.1", _closer(closed, "a3")) is None  # its own are protected
    b1 = limiter.admit("10.0.0.2", _closer(closed, "b1"))
    assert b1 is not None
    b1.protect()
    assert limiter.admit("10.0.0.3", _closer(closed, "c1")) is None  # full of protected ones
    assert limiter.open == 3 and not closed
    a1.release()
    a1.release()  # idempotent
    assert limiter.admit("10.0.0.3", _closer(closed, "c1")) is not None and limiter.open == 3
    assert not closed


def test_ipv6_addresses_count_per_64_against_the_per_address_cap():
    closed: list[str] = []
    limiter = ConnectionLimiter("modbus", max_total=10, max_per_address=2)
    first = limiter.admit("2001:db8:1:2::a", _closer(closed, "first"))
    assert first is not None
    assert limiter.admit("2001:db8:1:2:ffff::b", _closer(closed, "second")) is not None
    # The same /64: its own oldest half-open connection makes room.
    assert limiter.admit("2001:db8:1:2::c", _closer(closed, "third")) is not None
    assert closed == ["first"] and first.released and limiter.open == 2
    assert limiter.admit("2001:db8:1:3::a", _closer(closed, "other")) is not None  # another /64
    assert closed == ["first"] and limiter.open == 3


def test_limiter_refuses_addresses_outside_the_allow_list():
    limiter = ConnectionLimiter(
        "modbus", 10, 10, allow=parse_networks(["192.168.1.0/24", "fd00::1"])
    )
    assert limiter.admit("192.168.1.77", lambda: None) is not None
    assert limiter.admit("fd00::1", lambda: None) is not None
    assert limiter.admit("192.168.2.1", lambda: None) is None
    assert limiter.admit("fd00::2", lambda: None) is None
    assert limiter.admit("not an address", lambda: None) is None
    assert limiter.open == 2


def test_refusals_are_logged_at_most_once_a_minute_with_a_count(caplog):
    clock = Clock()
    limiter = ConnectionLimiter("evse", max_total=0, max_per_address=1, clock=clock)
    for _ in range(1000):
        limiter.admit("10.0.0.1", lambda: None)
        clock.now += 0.01  # 1000 refusals in 10 s
    clock.now = 61.0
    limiter.admit("10.0.0.9", lambda: None)
    lines = [r.getMessage() for r in caplog.records if r.name == "openwb_modbus_evse.limits"]
    assert len(lines) == 2
    assert "refused a connection from 10.0.0.1 (total" in lines[0]
    assert "10.0.0.9" in lines[1] and "999 more since the last such line" in lines[1]


def test_peer_addresses_and_networks():
    assert host_of(("::ffff:192.168.1.5", 1502, 0, 0)) == "192.168.1.5"
    assert host_of(("fe80::1", 1502, 0, 1)) == "fe80::1"
    assert address_in("192.168.1.5", parse_networks(["192.168.1.5"]))
    assert not address_in("192.168.1.6", parse_networks(["192.168.1.5"]))
    with pytest.raises(ValueError, match=r"'192\.168\.1\.300'"):
        parse_networks(["192.168.1.300"])


def test_address_list_keys_are_validated_and_take_a_comma_list():
    assert build({"modbus_allow": "127.0.0.1, 10.0.0.0/8"}).modbus_allow == parse_networks(
        ["127.0.0.1", "10.0.0.0/8"]
    )
    assert build({"modbus_write_allow": []}).modbus_write_allow == ()
    for key, value in (("modbus_allow", ["10.0.0.0/33"]), ("modbus_write_allow", 5)):
        with pytest.raises(ConfigError) as err:
            build({key: value})
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        build({"modbus_max_connections": 0})
    assert err.value.key == "modbus_max_connections"


def test_fd_limit_is_raised_towards_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_fd_limit(200) == 256  # enough already: left alone
        want = min(hard, 4096)
        assert raise_fd_limit(want) == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
        if hard != resource.RLIM_INFINITY:
            assert raise_fd_limit(hard + 1) == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_serve_refuses_caps_that_do_not_fit_the_open_file_limit(tmp_path):
    def low_hard_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "openwb_modbus_evse",
            "serve",
            "--evse-host",
            "127.0.0.1",
            "--evse-port",
            "0",
            "--modbus-host",
            "127.0.0.1",
            "--modbus-port",
            str(free_port()),
            "--metrics-port",
            "0",
            "--state-db",
            str(tmp_path / "s.sqlite3"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        preexec_fn=low_hard_limit,
    )
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("Error: modbus_max_connections: ") and "the limit is 200" in line


# --- the Modbus listener ----------------------------------------------------------------------


async def _open_from(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), 2) == b""
    except ConnectionResetError:
        return True


async def test_modbus_connections_are_capped_per_address_and_in_total(make_rig, settings):
    # 127.0.0.1 is an allowed network: its connections keep their place once they asked.
    rig = await make_rig(
        settings,
        modbus_max_connections=5,
        modbus_max_per_address=3,
        modbus_write_allow=parse_networks(["127.0.0.1"]),
    )
    await rig.station(1)
    limiter = rig.bridge.modbus.limiter
    clients = [await rig.client() for _ in range(3)]
    for client in clients:
        assert not (await client.read_input_registers(lp_base(1), count=1, device_id=1)).isError()
    assert await closed_at_once(rig.modbus_port)  # its own keep their place: refused
    assert refused(rig.bridge, "modbus", Refusal.PER_ADDRESS) == 1
    # Another address's silent connections fill the rest; at the total cap, a newcomer from a
    # third address takes the oldest silent one's place.
    silent = [await _open_from(rig.modbus_port, "127.0.0.2") for _ in range(2)]
    await eventually(lambda: limiter.open == 5)
    _, newcomer = await _open_from(rig.modbus_port, "127.0.0.3")
    assert await closed_by_server(silent[0][0])
    assert limiter.open == 5 and refused(rig.bridge, "modbus", Refusal.TOTAL) == 0
    clients[0].close()
    await eventually(lambda: limiter.open == 4)
    client = await rig.client()  # the freed slot is usable
    rr = await client.read_input_registers(lp_base(1), count=100, device_id=1)
    assert not rr.isError()
    for _, w in [*silent, (None, newcomer)]:
        w.close()


async def test_modbus_total_cap(make_rig, settings):
    rig = await make_rig(
        settings,
        modbus_max_connections=2,
        modbus_max_per_address=10,
        modbus_write_allow=parse_networks(["127.0.0.0/8"]),
    )
    await rig.station(1)
    clients = [await rig.client() for _ in range(2)]
    for client in clients:
        assert not (await client.read_input_registers(lp_base(1), count=1, device_id=1)).isError()
    assert await closed_at_once(rig.modbus_port)  # every connection keeps its place: refused
    assert refused(rig.bridge, "modbus", Refusal.TOTAL) == 1
    for client in clients:
        assert not (await client.read_input_registers(lp_base(1), count=1, device_id=1)).isError()


async def test_idle_modbus_connections_are_closed_polling_ones_are_not(make_rig, settings):
    rig = await make_rig(settings, modbus_idle_timeout=0.4)
    await rig.station(1)
    client = await rig.client()

    async def poll() -> None:  # every 0.1 s for 1.2 s
        for _ in range(12):
            rr = await client.read_input_registers(lp_base(1), count=10, device_id=1)
            assert not rr.isError()
            await asyncio.sleep(0.1)

    polling = asyncio.create_task(poll())
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.modbus_port)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(100), 3) == b""  # the silent one is closed
    assert asyncio.get_running_loop().time() - started >= 0.35
    await polling  # the polling one stays open all along
    assert rig.bridge.modbus.limiter.open == 1
    writer.close()


async def test_modbus_allow_refuses_other_addresses_at_accept(make_rig, settings):
    rig = await make_rig(settings, modbus_allow=parse_networks(["192.0.2.0/24", "::1"]))
    assert await closed_at_once(rig.modbus_port)
    assert refused(rig.bridge, "modbus", Refusal.NOT_ALLOWED) == 1
    assert rig.bridge.modbus.limiter.open == 0
    rig2 = await make_rig(
        settings, modbus_port=free_port(), modbus_allow=parse_networks(["127.0.0.0/8"])
    )
    await rig2.station(1)
    client = await rig2.client()
    assert not (await client.read_input_registers(lp_base(1), count=1, device_id=1)).isError()


async def test_a_read_only_address_gets_exception_1_for_writes_and_changes_nothing(
    make_rig, settings
):
    rig = await make_rig(settings, modbus_write_allow=parse_networks(["192.0.2.1"]))
    station = await rig.station(1, VehicleConfig(plug_in_after=0.0, reaction_s=0.05))
    point = rig.point(station.serial)
    await station.wait_for(lambda s: s.plugged)
    client = await rig.client()
    heard = rig.bridge.modbus_heartbeat.last_request
    for call in (
        client.write_register(SET_CURRENT, 1600, device_id=1),
        client.write_registers(SET_CURRENT, [1600], device_id=1),
        client.write_register(REGISTER_MAP.address(1, "cp_interruption"), 5, device_id=1),
    ):
        rr = await call
        assert rr.isError() and rr.exception_code == 1, rr
    rr = await client.read_input_registers(lp_base(1), count=100, device_id=1)
    assert not rr.isError()  # reading is allowed
    await asyncio.sleep(0.3)
    assert point.state.requested_ca == 0 and point.state.sequence is None
    assert all(r.type.name == "COLLECT_DATA" for r in station.received)
    assert not station.contactor
    # A read-only client does not keep the heartbeat: charging stops when the controller goes.
    assert rig.bridge.modbus_heartbeat.last_request == heard


# --- the station listener ---------------------------------------------------------------------


async def test_station_connections_are_capped_and_a_station_takes_a_silent_ones_place(
    make_rig, settings
):
    rig = await make_rig(
        settings,
        evse_max_connections=100,
        evse_max_per_address=2,
        station=(station_config(1, lp=1), station_config(2, lp=2)),
    )
    port = rig.bridge.link.port
    half_open = [await RawStation.connect(port) for _ in range(2)]  # no handshake
    first = await rig.station(1)  # takes the place of the oldest silent one
    assert await half_open[0].closed_by_peer()
    second = await rig.station(2)
    assert await half_open[1].closed_by_peer()
    assert rig.bridge.link.limiter.open == 2
    # Two known stations hold the address's places: a third connection is refused.
    extra = await RawStation.connect(port)
    assert await extra.closed_by_peer()
    assert refused(rig.bridge, "evse", Refusal.PER_ADDRESS) == 1
    assert {first.serial, second.serial} <= set(rig.bridge.link.sessions)


async def test_a_client_that_does_not_read_its_responses_is_not_read_either(make_rig, settings):
    rig = await make_rig(settings)
    await rig.station(1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", rig.modbus_port))
    _, writer = await asyncio.open_connection(sock=sock)
    server = rig.bridge.modbus._server
    await eventually(lambda: len(server.active_connections) == 1)
    (connection,) = server.active_connections.values()
    # Small kernel buffers on both sides, so that responses pile up in the transport quickly.
    connection.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    request = struct.pack(">HHHBBHH", 1, 0, 6, 1, 4, lp_base(1), 100)  # 209 bytes of response
    for _ in range(150):  # 1500 requests, 300 KiB of responses, none read
        writer.write(request * 10)
        await asyncio.sleep(0.001)
    await eventually(lambda: not connection.transport.is_reading())
    assert connection.transport.get_write_buffer_size() < 64 * 1024 + 21 * 209
    client = await rig.client()  # others are served meanwhile
    assert not (await client.read_input_registers(lp_base(1), count=1, device_id=1)).isError()
    writer.close()
