"""Shared test parts: real sockets on loopback, a raw fake station, the whole bridge in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import hypothesis
import pytest
from ports import free_port
from pymodbus.client import AsyncModbusTcpClient

from openwb_modbus_evse.config import Settings, StationConfig
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.service import Service
from openwb_modbus_evse.tools.simulator import VehicleConfig, VirtualStation, virtual_serial

# Examples are judged by what they find, not by how long one takes: on a loaded machine (four
# workers on two cores) a slow example is no failure.
hypothesis.settings.register_profile(
    "suite", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("suite")


@pytest.fixture(autouse=True)
def listen_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every server a test starts in this process listens on loopback, never on "::" or 0.0.0.0.

    Subprocesses (serve, demo, bench, brokers) are given loopback hosts by their tests.
    """
    listen = socket.socket.listen

    def loopback_listen(sock: socket.socket, *backlog: int) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = sock.getsockname()[0]
            assert host.startswith("127.") or host == "::1", f"a test listens on {host!r}"
        listen(sock, *backlog)

    monkeypatch.setattr(socket.socket, "listen", loopback_listen)


def require_tool(name: str) -> str:
    """Path of an external program; skipped if missing, unless CI says it must be there."""
    # Daemons such as mosquitto live in sbin, which is not on every user's PATH.
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("OPENWB_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed (run make install as root, or apt-get install)")
        pytest.skip(f"{name} is not installed")
    return path


async def eventually(
    check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Wait until ``check()`` is true."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(interval)


class RawStation:
    """A hand-driven station: the test decides every byte it sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, serial: str | None = None, firmware: int = 4) -> RawStation:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        station = cls(reader, writer)
        if serial is not None:
            writer.write(p.encode_handshake(serial, firmware))
        return station

    async def next_request(self, timeout: float = 3.0) -> p.Request:
        header = await asyncio.wait_for(self.reader.readexactly(p.HEADER_SIZE), timeout)
        kind, length = p.decode_header(header, p.REQUEST_TYPES)
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return p.decode_request(kind, body)

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True once the other side closed the connection (everything unread is discarded)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(4096):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def idle_data(**changes) -> p.StationData:
    """Data of a station with nothing plugged in."""
    data = p.StationData(
        contactor=False,
        pwm=100,
        pilot=p.Pilot.A_12V,
        proximity=p.Proximity.CABLE_32A,
        voltages_mv=(230_000, 230_000, 230_000),
        currents_ma=(0, 0, 0),
        rssi_dbm=-60,
        uptime_ms=1000,
        cp_adc=1,
        pp_adc=2,
    )
    return replace(data, **changes)


def metric(service: Service, name: str, /, **labels: str) -> float | None:
    """One sample of what a scrape of ``service`` shows now (None: no such sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = service.metrics.exposition(service.snapshot()).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# --- the whole bridge in-process ---------------------------------------------------------------

FAST = {"reconnect_delay": 0.2, "request_timeout": 2.0}


class Rig:
    """A running bridge, ways to add virtual stations, and a Modbus client."""

    def __init__(self, bridge: Service) -> None:
        self.bridge = bridge
        self.stations: list[VirtualStation] = []
        self.clients: list[AsyncModbusTcpClient] = []

    @property
    def modbus_port(self) -> int:
        assert self.bridge.modbus is not None
        return self.bridge.modbus.port

    async def station(
        self, index: int = 1, vehicle: VehicleConfig | None = None, **options
    ) -> VirtualStation:
        """A virtual station connected to the bridge, with a fast vehicle plugged in at once."""
        vehicle = vehicle or VehicleConfig(plug_in_after=0.0, reaction_s=0.05)
        station = VirtualStation(
            options.pop("serial", virtual_serial(index)),
            bridge=("127.0.0.1", self.bridge.link.port),
            vehicle=vehicle,
            **{**FAST, **options},
        )
        await station.start()
        self.stations.append(station)
        await eventually(lambda: station.serial in self.bridge.link.sessions)
        return station

    async def client(self) -> AsyncModbusTcpClient:
        client = AsyncModbusTcpClient("127.0.0.1", port=self.modbus_port, timeout=3, retries=0)
        assert await client.connect()
        self.clients.append(client)
        return client

    def point(self, serial: str):
        return self.bridge.registry.get(serial)

    def serial_number(self, serial: str) -> str:
        """What controllers read as the station's serial number (not its ID)."""
        return self.bridge.registry.get(serial).identity.serial_number

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        for station in self.stations:
            await station.stop()
        await self.bridge.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for an in-process bridge: free ports, a fresh state file, short timers."""
    return Settings(
        evse_host="127.0.0.1",
        evse_port=0,
        poll_interval=0.5,
        modbus_host="127.0.0.1",
        modbus_port=free_port(),
        metrics_port=0,
        state_db=str(tmp_path / "state.sqlite3"),
        stop_timeout=1.0,
        phase_switch_pause=0.3,
        contactor_min_off=0.0,  # tests that stop and resume charging need no rest
        lp_remember_after=0.5,
        energy_save_interval=0.5,
    )


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """``await make_rig(settings, **changes)`` starts a bridge; everything stops afterwards."""
    rigs: list[Rig] = []

    async def make(settings: Settings, **changes) -> Rig:
        bridge = Service(replace(settings, **changes))
        await bridge.start()
        rig = Rig(bridge)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.close()  # idempotent: a test may have closed it already


def station_config(index: int, lp: int, **kw) -> StationConfig:
    return StationConfig(serial=virtual_serial(index), lp=lp, **kw)


# --- a real MQTT broker --------------------------------------------------------------------------


class Broker:
    """A mosquitto on a free loopback port, started and stopped by the test (same port always)."""

    def __init__(
        self, directory: Path, listener_options: str = "", config: tuple[str, int] | None = None
    ) -> None:
        """``config``: a whole configuration and the port of its 127.0.0.1 listener."""
        self.executable = require_tool("mosquitto")
        self.port = config[1] if config else free_port()
        self.config = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        listener = f"listener {self.port} 127.0.0.1\n{listener_options or 'allow_anonymous true'}"
        self.config.write_text(
            f"{config[0] if config else listener}\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"  # as the README's configuration has it
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # Started as root it would switch to user mosquitto, who cannot read the test's files.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.executable, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

        def listening() -> bool:
            assert self.proc.poll() is None, f"mosquitto exited: {self.proc.stderr.read()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        await eventually(listening, timeout=10, interval=0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def restart(self) -> None:
        """Stop and start again on the same port; without persistence it forgets everything."""
        self.stop()
        await self.start()

    def settings(self, settings: Settings, **changes) -> Settings:
        """``settings`` with MQTT on this broker (and ``changes``)."""
        return replace(settings, mqtt_host="127.0.0.1", mqtt_port=self.port, **changes)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A running mosquitto for this test."""
    broker = Broker(tmp_path)
    await broker.start()
    yield broker
    broker.stop()


# --- the stations' public ids ----------------------------------------------------------------

PUBLIC_KEY = bytes(range(16))  # the key of the public ids, where a test seeds it


def seed_public_key(state_db: str) -> None:
    """Put PUBLIC_KEY into the state file, as a previous run would have left its key: the
    public ids (metric labels, MQTT topics) are known before the service starts."""
    from openwb_modbus_evse.identity import PUBLIC_ID_KEY_RECORD
    from openwb_modbus_evse.store import Store

    with Store(state_db) as store:
        store.save_records({PUBLIC_ID_KEY_RECORD: PUBLIC_KEY.hex()})


def public_id_of(serial: str) -> str:
    """The public id of ``serial`` with PUBLIC_KEY (not its ID)."""
    from openwb_modbus_evse.identity import public_id

    return public_id(PUBLIC_KEY, serial)
