"""The service as a process: start-up checks, SIGTERM shutdown, SIGKILL and the energy counter."""

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import eventually, free_port
from pymodbus.client import AsyncModbusTcpClient

from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig, VirtualStation, virtual_serial

ADDR = REGISTER_MAP.address
SERVE = [sys.executable, "-m", "openwb_modbus_evse", "serve"]
VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)


class Service:
    """``openwb-modbus-evse serve`` in a subprocess, with its own ports and state file."""

    def __init__(self, tmp_path: Path, **extra: object) -> None:
        self.evse_port, self.modbus_port = free_port(), free_port()
        self.state_db = tmp_path / "state.sqlite3"
        lines = {
            "evse_host": '"127.0.0.1"',
            "evse_port": self.evse_port,
            "modbus_host": '"127.0.0.1"',
            "modbus_port": self.modbus_port,
            "metrics_port": 0,
            "poll_interval": 0.5,
            "state_db": f'"{self.state_db}"',
            "energy_save_interval": 0.5,
            "stop_timeout": 2,
            "lp_remember_after": 0.5,  # a new station's LP and energy are saved after this
            "contactor_min_off": 0,
            **extra,
        }
        self.config = tmp_path / "config.toml"
        self.config.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [*SERVE, "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def listening() -> bool:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                with socket_to(self.modbus_port):
                    return True
            except OSError:
                return False

        await eventually(listening, timeout=10, interval=0.05)

    async def client(self) -> AsyncModbusTcpClient:
        client = AsyncModbusTcpClient("127.0.0.1", port=self.modbus_port, timeout=3, retries=0)
        assert await client.connect()
        return client

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def socket_to(port: int):
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=0.2)


async def energy_wh(client) -> int:
    rr = await client.read_input_registers(ADDR(1, "energy_imported"), count=2, device_id=1)
    assert not rr.isError(), rr
    return REGISTER_MAP.decode([0, 0, *rr.registers] + [0] * 96)["energy_imported"]


def stored_energy(db: Path, serial: str) -> float:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT imported_wh FROM energy WHERE serial = ?", (serial,)
        ).fetchone()[0]


@pytest.fixture
def service(tmp_path):
    services: list[Service] = []

    def make(**extra) -> Service:
        s = Service(tmp_path, **extra)
        services.append(s)
        return s

    yield make
    for s in services:
        s.stop()


async def charge(service: Service, client) -> VirtualStation:
    station = VirtualStation(
        virtual_serial(1),
        bridge=("127.0.0.1", service.evse_port),
        vehicle=VEHICLE,
        reconnect_delay=0.2,
    )
    await station.start()
    await station.wait_for(lambda s: s.connected and s.plugged, timeout=5)
    for _ in range(50):  # the LP block appears once the station is registered
        rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
        if not rr.isError():
            break
        await asyncio.sleep(0.1)
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    return station


@pytest.mark.slow
async def test_sigterm_stops_charging_safely_saves_energy_and_exits_0(service):
    svc = service()
    await svc.start()
    client = await svc.client()
    station = await charge(svc, client)
    await asyncio.sleep(1.5)
    read_before = await energy_wh(client)
    assert read_before > 0
    client.close()
    svc.proc.send_signal(signal.SIGTERM)
    await station.wait_for(lambda s: s.pwm == 100, timeout=3)
    assert any(station.currents_ma) or station.contactor  # PWM first, contactor after
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    code = await asyncio.to_thread(svc.proc.wait, 10)
    output = svc.proc.stdout.read()
    assert code == 0, output
    assert "Traceback" not in output and "stopped" in output
    assert stored_energy(svc.state_db, station.serial) >= read_before
    await station.stop()


@pytest.mark.slow
async def test_sigkill_loses_at_most_a_few_seconds_of_energy_and_never_goes_back(service):
    svc = service()
    await svc.start()
    client = await svc.client()
    station = await charge(svc, client)
    power_w = 3 * 230 * 15.6
    await asyncio.sleep(2.0)
    first = await energy_wh(client)
    await asyncio.sleep(1.0)
    at_kill = await energy_wh(client)
    os.kill(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait()
    client.close()
    await station.stop()  # the station stays away: the counter must come from the file

    svc2 = service()  # same state file, new ports
    assert svc2.state_db == svc.state_db
    await svc2.start()
    client = await svc2.client()
    after = await energy_wh(client)
    # At most one save interval plus one poll (1 s) of charging lost, and never below a value
    # read a second before the crash.
    assert first <= after <= at_kill
    assert at_kill - after <= power_w * 1.0 / 3600 + 1
    client.close()


def serve_with_state(db: Path) -> subprocess.CompletedProcess:
    """Start ``serve`` on free ports with this state file (expected to stop at once)."""
    ports = ["--evse-host", "127.0.0.1", "--evse-port", "0", "--modbus-port", "0"]
    ports += ["--metrics-port", "0"]
    return subprocess.run(
        [*SERVE, "--state-db", str(db), *ports], capture_output=True, text=True, timeout=20
    )


def test_corrupt_state_file_stops_start_up_with_one_line_and_keeps_the_file(tmp_path):
    db = tmp_path / "state.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    before = db.read_bytes()
    done = serve_with_state(db)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(db) in lines[0] and "Traceback" not in done.stderr, lines
    assert db.read_bytes() == before


def test_newer_schema_stops_start_up(tmp_path):
    db = tmp_path / "state.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA application_id = 0x6F574265")
        conn.execute("PRAGMA user_version = 99")
    done = serve_with_state(db)
    assert done.returncode != 0 and "newer" in done.stderr and str(db) in done.stderr


def test_port_in_use_is_one_clear_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                *SERVE,
                "--state-db",
                str(tmp_path / "s.db"),
                "--evse-host",
                "127.0.0.1",
                "--evse-port",
                str(port),
                "--modbus-port",
                "0",
                "--metrics-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
    lines = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(lines) == 1 and str(port) in lines[0], done.stderr
