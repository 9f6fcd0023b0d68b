"""The virtual station against a fake bridge over real loopback sockets."""

from __future__ import annotations

import asyncio

import pytest

from openwb_modbus_evse.chargepoint import offered_amps
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.tools.simulator import (
    VehicleConfig,
    VirtualStation,
    run_simulators,
    vehicle_amps,
    virtual_serial,
)

SERIAL = "10BA23AB50534D53302E3120FF162332"
REACTION = 0.1
A, B, C, FAULT = p.Pilot.A_12V, p.Pilot.B_9V, p.Pilot.C_6V, p.Pilot.FAULT


class Conn:
    """The bridge's side of one station connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes):
        self.reader, self.writer = reader, writer
        self.raw_handshake = raw
        self.handshake = p.decode_handshake(raw)
        self.notifies = 0

    async def read_frame(self, timeout: float = 2.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            frame_type, length = p.decode_header(
                await self.reader.readexactly(p.HEADER_SIZE), p.RESPONSE_TYPES
            )
            return frame_type, await self.reader.readexactly(length)

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def request(self, frame: bytes) -> tuple[int, bytes]:
        """Send a request; return the next frame that is not a notify (notifies are counted)."""
        await self.send(frame)
        while True:
            frame_type, body = await self.read_frame()
            if frame_type != p.ResponseType.NOTIFY:
                return frame_type, body
            assert body == b""
            self.notifies += 1

    async def data(self) -> p.StationData:
        frame_type, body = await self.request(p.collect_data())
        assert frame_type == p.ResponseType.DATA
        return p.decode_data(body, self.handshake.firmware)

    async def ack(self, frame: bytes) -> None:
        expected = {p.RequestType.SET_PWM: 3, p.RequestType.SET_CONTACTOR: 4}[frame[0]]
        assert await self.request(frame) == (expected, b"")

    async def expect_closed(self, timeout: float = 2.0) -> None:
        """Wait for the station to close the connection (EOF, nothing else on the way)."""
        async with asyncio.timeout(timeout):
            assert await self.reader.read() == b""

    async def expect_nothing(self, within: float) -> None:
        with pytest.raises(TimeoutError):
            await self.read_frame(timeout=within)


class FakeBridge:
    """A TCP server that reads each station's handshake and queues the connection."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[Conn] = asyncio.Queue()
        self.all: list[Conn] = []
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.address = ("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, await reader.readexactly(p.HANDSHAKE_SIZE))
        self.all.append(conn)
        await self.conns.put(conn)

    async def accept(self, timeout: float = 2.0) -> Conn:
        async with asyncio.timeout(timeout):
            return await self.conns.get()

    async def close(self) -> None:
        for conn in self.all:
            conn.writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def bridge():
    fake = FakeBridge()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def connect(bridge):
    """Start a station (short timings) and return it with its first connection."""
    stations: list[VirtualStation] = []

    async def make(serial: str = SERIAL, **kwargs) -> tuple[VirtualStation, Conn]:
        options = {
            "bridge": bridge.address,
            "vehicle": VehicleConfig(plug_in_after=None, reaction_s=REACTION),
            "reconnect_delay": 0.1,
            "request_timeout": 5.0,
            "safety_timeout": 60.0,
        }
        options.update(kwargs)
        station = VirtualStation(serial, **options)
        stations.append(station)
        await station.start()
        return station, await bridge.accept()

    yield make
    for station in stations:
        await station.stop()


async def charging(connect, **vehicle) -> tuple[VirtualStation, Conn]:
    """A station whose vehicle is at C behind a closed contactor, offered 16 A (26 %)."""
    vehicle_config = VehicleConfig(plug_in_after=None, reaction_s=REACTION, **vehicle)
    station, conn = await connect(vehicle=vehicle_config)
    station.plug_in()
    await conn.ack(p.set_pwm(26))
    await conn.ack(p.set_contactor(True))
    # One notify for the plug-in, one for B -> C with current starting; read both.
    await station.wait_for(lambda s: s.pilot is C and s.notifies_sent == 2)
    for _ in range(2 - conn.notifies):
        assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")
    conn.notifies = 0
    return station, conn


# --- handshake and framing -------------------------------------------------------------------


def test_virtual_serials_are_distinct_32_hex_digits():
    assert virtual_serial(1) == "5649525455414C" + "0" * 17 + "1"
    assert virtual_serial(255).endswith("0000FF")
    serials = {virtual_serial(i) for i in range(1, 50)}
    assert len(serials) == 49
    assert all(len(s) == 32 and bytes.fromhex(s) for s in serials)


async def test_handshake_is_serial_bytes_then_firmware(connect):
    station, conn = await connect(firmware=7)
    assert conn.raw_handshake == bytes.fromhex(SERIAL) + b"\x07"
    assert conn.handshake == p.Handshake(serial=SERIAL, firmware=7)
    await station.wait_for(lambda s: s.connected and s.connections == 1)


def test_bad_serial_is_refused_at_construction():
    with pytest.raises(ValueError):
        VirtualStation("1234")


async def test_every_request_is_answered_with_its_frame(connect):
    station, conn = await connect()
    assert await conn.request(p.ping()) == (p.ResponseType.PONG, b"")
    frame_type, body = await conn.request(p.collect_data())
    assert frame_type == p.ResponseType.DATA and len(body) >= 44
    assert await conn.request(p.set_pwm(26)) == (p.ResponseType.PWM_ACK, b"")
    assert await conn.request(p.set_contactor(True)) == (p.ResponseType.CONTACTOR_ACK, b"")
    assert [r.type for r in station.received] == [
        p.RequestType.PING,
        p.RequestType.COLLECT_DATA,
        p.RequestType.SET_PWM,
        p.RequestType.SET_CONTACTOR,
    ]


async def test_firmware_upload_is_recorded_but_never_answered(connect):
    station, conn = await connect(firmware_update="ignore")
    await conn.send(p.firmware_upload(b"image"))
    await conn.expect_nothing(within=0.2)
    # The next answer is the ping's: nothing was queued for the upload.
    assert await conn.request(p.ping()) == (p.ResponseType.PONG, b"")
    upload = station.received[0]
    assert upload.type is p.RequestType.FIRMWARE_UPLOAD
    assert upload.image == b"image" and upload.crc_ok
    assert "firmware upload 5 bytes crc ok" in (await conn.data()).log_lines


async def test_firmware_upload_makes_the_station_restart_with_the_new_version(connect, bridge):
    station, conn = await connect(firmware_after_update=7)
    await conn.request(p.set_pwm(26))
    await conn.send(p.firmware_upload(b"new image"))
    await conn.expect_closed()
    again = await bridge.accept()  # after reconnect_delay, with the new version
    assert again.handshake.firmware == 7 and station.firmware == 7
    assert station.uploads == [b"new image"] and station.pwm == 100  # outputs off after a restart
    data = await again.data()
    assert data.pwm == 100 and not data.contactor


async def test_firmware_upload_with_a_bad_crc_changes_nothing(connect):
    station, conn = await connect(firmware_after_update=7)
    frame = bytearray(p.firmware_upload(b"new image"))
    frame[-1] ^= 0xFF
    await conn.send(bytes(frame))
    assert await conn.request(p.ping()) == (p.ResponseType.PONG, b"")
    assert station.uploads == [] and station.firmware == 4 and station.connections == 1
    assert "firmware upload 9 bytes crc bad" in (await conn.data()).log_lines


# --- data response ---------------------------------------------------------------------------


@pytest.mark.parametrize(("firmware", "fixed"), [(2, 36), (4, 44)])
async def test_data_response_layout_depends_on_firmware(connect, bridge, firmware, fixed):
    station, conn = await connect(firmware=firmware)
    first = await conn.data()
    assert first.log_lines == (f"connected to 127.0.0.1:{bridge.address[1]}",)
    # Nothing happened since: the second response is exactly the fixed part.
    frame_type, body = await conn.request(p.collect_data())
    assert frame_type == p.ResponseType.DATA and len(body) == fixed
    data = p.decode_data(body, firmware)
    assert (data.contactor, data.pwm, data.pilot) == (False, 100, A)
    assert data.proximity is p.Proximity.CABLE_32A
    assert data.voltages_mv == (230_000, 230_000, 230_000)
    assert data.currents_ma == (0, 0, 0)
    assert data.rssi_dbm == -62
    assert 0 <= data.uptime_ms < 5_000
    if firmware >= 3:
        assert data.cp_adc and data.pp_adc
    else:
        assert data.cp_adc is None and data.pp_adc is None
    assert station.firmware == firmware


async def test_uptime_counts_from_start(connect):
    _, conn = await connect()
    first = (await conn.data()).uptime_ms
    await asyncio.sleep(0.1)
    assert (await conn.data()).uptime_ms - first >= 90


async def test_uptime_wraps_like_an_int32(connect):
    station, conn = await connect()
    # Pretend the station has been up for 2**31 ms plus one second.
    station._started_at = asyncio.get_running_loop().time() - (2**31 + 1000) / 1000
    uptime = (await conn.data()).uptime_ms
    assert -(2**31) + 1000 <= uptime < -(2**31) + 2000


async def test_voltage_jitter_stays_within_bounds(connect):
    _, conn = await connect(voltage_v=400.0, voltage_jitter_v=5.0)
    volts = [v for _ in range(4) for v in (await conn.data()).voltages_mv]
    assert all(395_000 <= v <= 405_000 for v in volts)
    assert len(set(volts)) > 1


async def test_pwm_and_contactor_show_in_next_data_response(connect):
    station, conn = await connect()
    await conn.ack(p.set_pwm(26))
    await conn.ack(p.set_contactor(True))
    assert (station.pwm, station.contactor) == (26, True)
    data = await conn.data()
    assert (data.pwm, data.contactor) == (26, True)
    assert data.log_lines[-2:] == ("pwm 26%", "contactor on")
    await conn.ack(p.set_contactor(False))
    data = await conn.data()
    assert not data.contactor
    assert data.log_lines == ("contactor off",)


async def test_log_buffer_keeps_the_newest_1024_bytes(connect):
    _, conn = await connect()
    for i in range(200):
        await conn.ack(p.set_pwm(10 + i % 80))
    _, body = await conn.request(p.collect_data())
    logs = body[44:]
    assert len(logs) <= 1024
    data = p.decode_data(body, 4)
    assert data.log_lines[-1] == f"pwm {10 + 199 % 80}%"
    assert not any(line.startswith("connected") for line in data.log_lines)


# --- vehicle ---------------------------------------------------------------------------------


async def test_vehicle_goes_a_b_c_and_draws_only_with_contactor_closed(connect):
    station, conn = await connect()
    assert (await conn.data()).pilot is A
    station.plug_in()
    assert station.pilot is B
    assert (await conn.data()).pilot is B
    await conn.ack(p.set_pwm(26))
    assert station.pilot is B  # the vehicle takes reaction_s to notice the PWM
    await station.wait_for(lambda s: s.pilot is C)
    data = await conn.data()
    assert data.pilot is C and data.currents_ma == (0, 0, 0)  # contactor still open
    await conn.ack(p.set_contactor(True))
    data = await conn.data()
    assert data.currents_ma == (15_600, 15_600, 15_600)
    assert "current 15.6A" in data.log_lines
    await conn.ack(p.set_contactor(False))
    assert station.currents_ma == (0, 0, 0)  # at once, not after reaction_s
    assert station.pilot is C


@pytest.mark.parametrize(
    ("pwm", "limit", "phases", "expected"),
    [
        (26, 10.0, 1, (10_000, 0, 0)),
        (26, 32.0, 1, (15_600, 0, 0)),
        (26, 32.0, 3, (15_600, 15_600, 15_600)),
        (90, 32.0, 3, (32_000, 32_000, 32_000)),
    ],
)
async def test_vehicle_draws_min_of_offer_and_own_limit(connect, pwm, limit, phases, expected):
    station, conn = await connect(
        vehicle=VehicleConfig(reaction_s=0.02, max_current_a=limit, phases=phases)
    )
    await station.wait_for(lambda s: s.plugged)
    await conn.ack(p.set_contactor(True))
    await conn.ack(p.set_pwm(pwm))
    await station.wait_for(lambda s: s.pilot is C)
    assert (await conn.data()).currents_ma == expected


# IEC 61851-1 Annex A, worked out by hand: the corners of the table and a few points between.
IEC_TABLE = [
    (0, 0.0),  # state F
    (5, 0.0),
    (9, 0.0),
    (10, 6.0),  # the lowest charging current
    (11, 6.6),
    (26, 15.6),
    (50, 30.0),
    (53, 31.8),
    (84, 50.4),
    (85, 51.0),  # the last duty x 0.6 A
    (86, 55.0),  # the first (duty - 64) x 2.5 A
    (90, 65.0),
    (95, 77.5),
    (96, 80.0),  # the highest charging current
    (97, 0.0),
    (99, 0.0),
    (100, 0.0),  # constant +12 V: no charging
]


@pytest.mark.parametrize(("duty", "amps"), IEC_TABLE)
def test_vehicle_and_service_read_the_duty_cycle_table_alike(duty, amps):
    # Each against the hand-made table, so they agree and an error in either shows by name.
    assert vehicle_amps(duty) == pytest.approx(amps)
    assert offered_amps(duty) == pytest.approx(amps)


async def test_vehicle_follows_a_new_pwm_after_reaction_time(connect):
    station, conn = await charging(connect, max_current_a=32.0)
    await conn.ack(p.set_pwm(10))
    assert station.currents_ma[0] == 15_600
    await station.wait_for(lambda s: s.currents_ma[0] == 6_000)


async def test_pwm_100_stops_the_vehicle_after_reaction_time(connect):
    station, conn = await charging(connect)
    loop = asyncio.get_running_loop()
    await station.wait_for(lambda s: any(s.currents_ma))
    await conn.ack(p.set_pwm(100))
    started = loop.time()
    assert station.pilot is C and any(station.currents_ma)  # still drawing for reaction_s
    await station.wait_for(lambda s: s.pilot is B)
    assert loop.time() - started >= REACTION * 0.8
    data = await conn.data()
    assert data.pilot is B and data.currents_ma == (0, 0, 0) and data.contactor
    assert {"pilot 6V->9V", "current off"} <= set(data.log_lines)


async def test_pwm_0_is_a_pilot_fault_and_the_vehicle_stops_at_once(connect):
    station, conn = await charging(connect)
    await conn.ack(p.set_pwm(0))
    assert station.pilot is FAULT and station.currents_ma == (0, 0, 0)
    data = await conn.data()
    assert int(data.pilot) == 4 and data.currents_ma == (0, 0, 0)
    assert "pilot 6V->fault" in data.log_lines
    await conn.ack(p.set_pwm(26))
    assert station.pilot is B  # -12 V is gone at once, the vehicle needs reaction_s for C
    await station.wait_for(lambda s: s.pilot is C and any(s.currents_ma))


async def test_unplug_gives_pilot_a_at_once_and_leaves_the_contactor(connect):
    station, conn = await charging(connect)
    station.unplug()
    assert (station.pilot, station.currents_ma, station.contactor) == (A, (0, 0, 0), True)
    data = await conn.data()
    assert (data.pilot, data.currents_ma, data.contactor) == (A, (0, 0, 0), True)
    assert "pilot 6V->12V" in data.log_lines


async def test_vehicle_config_plugs_in_and_out_by_itself(connect):
    station, conn = await connect(vehicle=VehicleConfig(plug_in_after=0.1, unplug_after=0.1))
    assert not station.plugged
    assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")  # A -> B
    assert station.plugged and station.pilot is B
    assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")  # B -> A
    assert not station.plugged and station.pilot is A
    assert station.notifies_sent == 2


# --- notify ----------------------------------------------------------------------------------


async def test_notify_is_sent_on_pilot_change(connect):
    station, conn = await connect()
    station.plug_in()
    assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")
    await conn.send(p.set_pwm(26))
    assert await conn.read_frame() == (p.ResponseType.PWM_ACK, b"")
    assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")  # B -> C after reaction_s
    assert station.pilot is C and station.notifies_sent == 2


async def test_no_notify_for_what_a_command_caused(connect):
    station, conn = await charging(connect)
    await conn.ack(p.set_contactor(False))  # current stops because of the command
    await conn.ack(p.set_contactor(True))  # and starts again
    await conn.ack(p.set_pwm(0))  # pilot fault because of the command
    assert await conn.request(p.ping()) == (p.ResponseType.PONG, b"")
    assert conn.notifies == 0 and station.notifies_sent == 2


async def test_notify_is_sent_when_current_stops_by_itself(connect):
    station, conn = await charging(connect)
    await conn.send(p.set_pwm(100))
    assert await conn.read_frame() == (p.ResponseType.PWM_ACK, b"")
    assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")
    assert station.pilot is B


# --- connection handling ---------------------------------------------------------------------


async def test_idle_connection_is_dropped_and_reestablished(connect, bridge):
    loop = asyncio.get_running_loop()
    station, conn = await connect(request_timeout=0.3, reconnect_delay=0.2)
    started = loop.time()
    await conn.expect_closed()
    dropped = loop.time()
    assert dropped - started >= 0.25
    second = await bridge.accept()
    assert loop.time() - dropped >= 0.15
    assert second.handshake.serial == SERIAL
    await station.wait_for(lambda s: s.connected and s.connections == 2)
    assert "request timeout" in (await second.data()).log_lines


async def test_requests_keep_the_connection_alive(connect, bridge):
    station, conn = await connect(request_timeout=0.25)
    for _ in range(6):  # 0.5 s in all, twice request_timeout
        await asyncio.sleep(0.08)
        assert await conn.request(p.ping()) == (p.ResponseType.PONG, b"")
    assert station.connections == 1 and bridge.conns.empty()


async def test_station_retries_until_the_bridge_is_up():
    absent = FakeBridge()
    await absent.start()
    address = absent.address
    await absent.close()
    station = VirtualStation(SERIAL, bridge=address, reconnect_delay=0.05)
    late = FakeBridge()
    await station.start()
    try:
        await asyncio.sleep(0.2)  # a few refused attempts
        assert not station.connected and station.connections == 0
        await late.start(port=address[1])
        conn = await late.accept()
        assert conn.handshake.serial == SERIAL
        await station.wait_for(lambda s: s.connected and s.connections == 1)
    finally:
        await station.stop()
        await late.close()


async def test_stop_closes_the_connection_and_is_idempotent(connect):
    station, conn = await connect()
    await station.stop()
    await conn.expect_closed()
    assert not station.connected
    await station.stop()


async def test_safety_timeout_switches_off_by_itself(connect):
    _, conn = await connect(safety_timeout=0.4)
    await conn.ack(p.set_pwm(26))
    await conn.ack(p.set_contactor(True))
    assert await conn.read_frame() == (p.ResponseType.NOTIFY, b"")
    data = await conn.data()
    assert (data.pwm, data.contactor) == (100, False)
    assert "safety timeout" in data.log_lines


async def test_safety_timeout_runs_across_reconnects(connect, bridge):
    loop = asyncio.get_running_loop()
    station, conn = await connect(safety_timeout=0.6, request_timeout=0.15, reconnect_delay=0.05)
    await conn.ack(p.set_contactor(True))
    last_request = loop.time()
    await station.wait_for(lambda s: not s.contactor)
    assert loop.time() - last_request >= 0.5
    assert station.connections >= 3  # the reconnects did not restart the safety timer
    assert station.pwm == 100


async def test_silent_station_answers_nothing_but_keeps_the_connection(connect):
    station, conn = await connect()
    station.set_silent(True)
    await conn.send(p.set_pwm(26))
    await conn.expect_nothing(within=0.3)
    assert station.received[-1] == p.Request(p.RequestType.SET_PWM, pwm=26)
    assert station.connected and station.pwm == 100  # not applied either
    station.set_silent(False)
    assert await conn.request(p.ping()) == (p.ResponseType.PONG, b"")


@pytest.mark.parametrize(
    "frame",
    [
        b"\x09\x00\x00\x00\x00",  # unknown type
        b"\x04\x00\x00\x00\x02\x1a\x00",  # PWM body too long
        b"\x04\x00\x00\x00\x01\x65",  # PWM 101 %
        b"\x01\x00\x00\x00\x01\x00",  # ping with a body
        b"\x02\x00\x20\x00\x00",  # oversize: 2 MiB, above the largest firmware image
    ],
    ids=["unknown-type", "long-pwm-body", "pwm-101", "ping-with-body", "oversize"],
)
async def test_malformed_request_drops_the_connection(connect, bridge, frame):
    station, conn = await connect()
    await conn.send(frame)
    await conn.expect_closed()
    second = await bridge.accept()
    assert await second.request(p.ping()) == (p.ResponseType.PONG, b"")
    assert [r.type for r in station.received] == [p.RequestType.PING]


async def test_wait_for_times_out():
    station = VirtualStation(SERIAL)
    with pytest.raises(TimeoutError):
        await station.wait_for(lambda s: s.plugged, timeout=0.05)


# --- run_simulators --------------------------------------------------------------------------


async def test_run_simulators_starts_stations_with_distinct_serials(bridge):
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_simulators(
            bridge.address, count=2, vehicle=VehicleConfig(plug_in_after=None), stop=stop
        )
    )
    conns = [await bridge.accept(), await bridge.accept()]
    assert {c.handshake.serial for c in conns} == {virtual_serial(1), virtual_serial(2)}
    assert all(c.handshake.firmware == 4 for c in conns)
    stop.set()
    async with asyncio.timeout(2):
        await task
    for conn in conns:
        await conn.expect_closed()


async def test_run_simulators_uses_a_given_serial(bridge):
    stop = asyncio.Event()
    task = asyncio.create_task(run_simulators(bridge.address, serial=SERIAL, firmware=2, stop=stop))
    conn = await bridge.accept()
    assert conn.handshake == p.Handshake(serial=SERIAL, firmware=2)
    stop.set()
    async with asyncio.timeout(2):
        await task


async def test_run_simulators_refuses_a_serial_for_several_stations():
    with pytest.raises(ValueError):
        await run_simulators(("127.0.0.1", 1), count=2, serial=SERIAL)
