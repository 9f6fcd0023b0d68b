"""Benchmarks of the bridge, run as ``python -m bench`` (``make bench``) from the repo root.

The parts, each against a fresh ``openwb-modbus-evse serve`` subprocess on free loopback ports:

1. ``modbus``: Modbus read throughput and latency (whole LP1 block, function code 4) with 1 and 8
   concurrent clients, side by side with a plain pymodbus server holding static registers (a
   subprocess too: ``python -m bench --plain-server PORT``) and a libmodbus server; the
   load comes from a C program on libmodbus (``make bench`` builds bench/bench_client.c and
   bench/bench_server.c into .venv/bin/; without them, pymodbus clients in this process).
2. ``latency``: from a write of the set-current register to the set-PWM command on the station.
   ``mqtt``: the same from an openWB primary's set_current over MQTT (a real mosquitto).
   ``bridge``: the same from a Rust-bridge ``request_set_pwm_percent`` over MQTT, and from a
   poll to its ``response_collect_data`` at a subscriber.
3. ``capacity``: how many stations one bridge keeps polled on time, with its CPU and memory use.
4. ``heartbeat``: from the heartbeat deadline to the PWM-100 command.
5. ``scrape``: Modbus latency with 200 stations, quiet and while 20 scrapers hammer /metrics
   (a subprocess: ``python -m bench --scrapers N URL SECONDS``), and a burst of 300
   simultaneous scrapes.
6. ``idle``: Modbus latency, quiet and after 1000 connections that never send were opened (with
   the default connection caps, and with caps that hold them all).

The stations (and the controllers of parts 5 and 6) run in this process; register numbers come from
REGISTER_MAP, the station frames from the protocol codec. Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pymodbus.client import AsyncModbusTcpClient

from openwb_modbus_evse.chargepoint import CA_PER_PWM_PERCENT, offered_amps
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.modbus.registers import LP_STRIDE, REGISTER_MAP, Value, lp_base
from openwb_modbus_evse.simulator import VehicleConfig, VirtualStation, virtual_serial
from tests.ports import free_port

PARTS = ("modbus", "latency", "mqtt", "bridge", "capacity", "heartbeat", "scrape", "idle")
LP = 1
BLOCK_START = lp_base(LP)
BLOCK_SIZE = LP_STRIDE  # the whole LP block
SET_CURRENT = REGISTER_MAP.address(LP, "set_current")
# C programs on libmodbus that `make bench` builds into the venv (bench/bench_client.c,
# bench/bench_server.c).
C_CLIENT = Path(sys.executable).parent / "bench_client"
C_SERVER = Path(sys.executable).parent / "bench_server"
DEVICE_ID = 1
HOST = "127.0.0.1"
FIRMWARE = 4
POLL_INTERVAL = 5.0  # the bridge's default
POLL_TOLERANCE = 1.0  # a poll counts as on time within POLL_INTERVAL +- this
CONNECT_BATCH = 50  # stations connecting at once: stays well inside the listen backlog
STATION_AMPS = 16.0  # what the charging vehicle draws per phase (at most)
# What the plain reference server serves: a vehicle charging at 16 A on three phases.
SNAPSHOT: dict[str, Value] = {
    "power": 11040,
    "energy_imported": 123456,
    "voltage_l1": 230.0,
    "voltage_l2": 230.0,
    "voltage_l3": 230.0,
    "current_l1": 16.0,
    "current_l2": 16.0,
    "current_l3": 16.0,
    "plugged": 1,
    "charging": 1,
    "offered_current": 16.0,
    "power_l1": 3680,
    "power_l2": 3680,
    "power_l3": 3680,
    "hardware_type": 1,
    "serial_number": virtual_serial(1)[-20:],
}


class BenchError(Exception):
    """Something the bench needs did not happen (the message says what)."""


def say(message: str) -> None:
    """Progress, on stderr so that stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics and tables ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def section(title: str, body: str, notes: Sequence[str] = ()) -> None:
    """Print one part of the report."""
    print(f"\n== {title}\n{body}")
    for note in notes:
        print(f"   {note}")
    sys.stdout.flush()


# --- subprocesses -------------------------------------------------------------------------------


class Child:
    """A subprocess of the bench; output goes to a log file, and it never outlives the bench."""

    running: ClassVar[list[Child]] = []
    _CLK_TCK = os.sysconf("SC_CLK_TCK")

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as out:
            # Own session: Ctrl-C reaches only the bench, which stops its children in order.
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        Child.running.append(self)

    @property
    def pid(self) -> int:
        """Process ID."""
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise BenchError (with the end of its log) if the process has exited."""
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with code {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's output."""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text("utf-8", "replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces; the fields after it do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / self._CLK_TCK  # utime, stime

    def memory_kib(self) -> tuple[int, int]:
        """Resident set size now and at its peak, in KiB (from /proc/PID/status)."""
        found: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for row in f:
                key, _, rest = row.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(rest.split()[0])
        return found.get("VmRSS", 0), found.get("VmHWM", 0)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ValueError):
            Child.running.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        """Stop every child still running (the way out, also after Ctrl-C)."""
        for child in list(cls.running):
            child.stop(timeout=5.0)


class CpuMeter:
    """CPU use of a child and of the bench itself over a wall-clock window."""

    def __init__(self, child: Child) -> None:
        self._child = child
        self._start = (time.perf_counter(), child.cpu_seconds(), time.process_time())

    def percent(self) -> tuple[float, float]:
        """(child, bench) CPU use since creation, in % of one core."""
        wall, child, own = self._start
        elapsed = time.perf_counter() - wall
        return (
            100 * (self._child.cpu_seconds() - child) / elapsed,
            100 * (time.process_time() - own) / elapsed,
        )


async def wait_listening(port: int, child: Child, timeout: float = 15.0) -> None:
    """Return once ``port`` accepts connections; BenchError if ``child`` dies or is too slow."""
    deadline = time.perf_counter() + timeout
    while True:
        child.check_alive()
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{child.name} does not listen on port {port} after {timeout:g} s:\n"
                    f"{child.log_tail()}"
                ) from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


@dataclass
class BridgeProcess:
    """``openwb-modbus-evse serve`` in a subprocess."""

    child: Child
    evse_port: int
    modbus_port: int
    argv: list[str]

    @property
    def options(self) -> str:
        """The command line, without the interpreter and the temporary paths."""
        shown, skip = [], False
        for arg in self.argv[2:]:
            if skip:
                shown.append("<tmp>")
                skip = False
                continue
            shown.append(arg)
            skip = arg == "--state-db"
        return " ".join(shown)


async def start_bridge(workdir: Path, name: str, *extra: str) -> BridgeProcess:
    """Start the bridge on free loopback ports with a fresh state file; wait until it listens."""
    evse_port, modbus_port = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "openwb_modbus_evse",
        "serve",
        "--evse-host",
        HOST,
        "--evse-port",
        str(evse_port),
        "--modbus-host",
        HOST,
        "--modbus-port",
        str(modbus_port),
        "--metrics-port",
        "0",
        "--state-db",
        str(workdir / f"{name}.sqlite3"),
        "--log-level",
        "WARNING",  # INFO would log every station connecting in the capacity runs
        *extra,
    ]
    child = Child(f"bridge ({name})", argv, workdir / f"{name}.log")
    await wait_listening(modbus_port, child)  # the Modbus server starts after the station link
    return BridgeProcess(child, evse_port, modbus_port, argv)


async def start_plain_server(workdir: Path) -> tuple[Child, int]:
    """The reference pymodbus server (this module with --plain-server) in a subprocess."""
    port = free_port()
    argv = [sys.executable, "-m", "bench", "--plain-server", str(port)]
    child = Child("plain pymodbus server", argv, workdir / "plain.log")
    await wait_listening(port, child)
    return child, port


def run_plain_server(port: int) -> None:
    """Serve LP1's block as static registers with pymodbus' device API, until terminated."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # A list of values is the block itself; SimData's count would repeat the whole list.
    block = SimData(
        address=BLOCK_START, values=REGISTER_MAP.encode(SNAPSHOT), datatype=DataType.REGISTERS
    )
    device = SimDevice(id=DEVICE_ID, simdata=[block])

    async def serve() -> None:
        server = ModbusTcpServer(device, address=(HOST, port))
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# --- Modbus client helpers ----------------------------------------------------------------------


async def modbus_client(port: int) -> AsyncModbusTcpClient:
    """A connected pymodbus client."""
    client = AsyncModbusTcpClient(HOST, port=port, timeout=3, retries=0)
    if not await client.connect():
        raise BenchError(f"cannot connect a Modbus client to port {port}")
    return client


async def read_block(client: AsyncModbusTcpClient) -> bool:
    """Read LP1's whole block with function code 4; True if it was answered without error."""
    rr = await client.read_input_registers(BLOCK_START, count=BLOCK_SIZE, device_id=DEVICE_ID)
    return not rr.isError()


async def wait_for_lp(client: AsyncModbusTcpClient, timeout: float = 15.0) -> None:
    """Wait until LP1 is served (its station has registered with the bridge)."""
    async with asyncio.timeout(timeout):
        while not await read_block(client):
            await asyncio.sleep(0.05)


async def write_current(client: AsyncModbusTcpClient, centiamps: int) -> None:
    """Write the set-current register of LP1 with function code 6."""
    rr = await client.write_register(SET_CURRENT, centiamps, device_id=DEVICE_ID)
    if rr.isError():
        raise BenchError(f"writing {centiamps} to {SET_CURRENT} failed: {rr}")


# --- a minimal station --------------------------------------------------------------------------


class MiniStation(asyncio.Protocol):
    """A minimal Dehne-EVSE station with a plugged vehicle, timestamping every request.

    Handshake on connect; collect-data is answered with data for a vehicle behind a 32 A cable
    (pilot B, or C with ``requests_power``: it then draws up to 16 A per phase while the contactor
    is closed and a current is offered); set-PWM and set-contactor are applied and acknowledged.
    Plain ``asyncio.Protocol`` so that a thousand of them fit in the bench process.
    """

    def __init__(self, serial: str, *, requests_power: bool = False, record: bool = False) -> None:
        self.serial = serial
        self.requests_power = requests_power
        self.pwm = 100
        self.contactor = False
        self.polls: list[float] = []  # arrival times of collect-data requests
        # Every request with its arrival time, for the parts that wait for a command.
        self.requests: asyncio.Queue[tuple[float, p.Request]] | None = (
            asyncio.Queue() if record else None
        )
        self.lost = False
        self.error: str | None = None
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._frames: dict[tuple[int, bool], bytes] = {}

    async def connect(self, port: int) -> None:
        """Connect to the bridge's station port (the handshake follows at once)."""
        await asyncio.get_running_loop().create_connection(lambda: self, HOST, port)

    def close(self) -> None:
        """Drop the connection."""
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(p.encode_handshake(self.serial, FIRMWARE))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()  # before decoding: the arrival time
        self._buffer += data
        try:
            while len(self._buffer) >= p.HEADER_SIZE:
                kind, length = p.decode_header(
                    bytes(self._buffer[: p.HEADER_SIZE]), p.REQUEST_TYPES
                )
                end = p.HEADER_SIZE + length
                if len(self._buffer) < end:
                    break
                request = p.decode_request(kind, bytes(self._buffer[p.HEADER_SIZE : end]))
                del self._buffer[:end]
                self._answer(request, now)
        except p.ProtocolError as err:
            self.error = str(err)
            self.close()

    def _answer(self, request: p.Request, now: float) -> None:
        assert self._transport is not None
        if self.requests is not None:
            self.requests.put_nowait((now, request))
        if request.type is p.RequestType.COLLECT_DATA:
            self.polls.append(now)
            self._transport.write(self._data_frame())
        elif request.type is p.RequestType.SET_PWM:
            assert request.pwm is not None
            self.pwm = request.pwm
            self._transport.write(p.pwm_ack())
        elif request.type is p.RequestType.SET_CONTACTOR:
            assert request.contactor is not None
            self.contactor = request.contactor
            self._transport.write(p.contactor_ack())
        elif request.type is p.RequestType.PING:
            self._transport.write(p.pong())

    def _data_frame(self) -> bytes:
        # Cached per output state: a thousand stations are polled in bursts, and the bench must
        # not be the slow side (the uptime in a cached frame stands still; only a metric shows it).
        key = (self.pwm, self.contactor)
        frame = self._frames.get(key)
        if frame is None:
            drawing = self.requests_power and self.contactor
            amps = min(STATION_AMPS, offered_amps(self.pwm)) if drawing else 0.0
            pilot = p.Pilot.C_6V if self.requests_power else p.Pilot.B_9V
            data = p.StationData(
                contactor=self.contactor,
                pwm=self.pwm,
                pilot=pilot,
                proximity=p.Proximity.CABLE_32A,
                voltages_mv=(230_000, 230_000, 230_000),
                currents_ma=(round(amps * 1000),) * 3,  # type: ignore[arg-type]
                rssi_dbm=-60,
                uptime_ms=int(time.perf_counter() * 1000) % p.INT32_MAX,
                cp_adc=2720 if self.requests_power else 3310,
                pp_adc=1130,
            )
            frame = self._frames[key] = p.encode_data(data, FIRMWARE)
        return frame

    def drain(self) -> None:
        """Forget the requests received so far."""
        assert self.requests is not None
        while not self.requests.empty():
            self.requests.get_nowait()

    async def expect(
        self, match: Callable[[p.Request], bool], timeout: float
    ) -> tuple[float, p.Request]:
        """The next request that matches, with its arrival time; others are dropped."""
        assert self.requests is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    at, request = await self.requests.get()
                    if match(request):
                        return at, request
        except TimeoutError:
            why = f" (connection dropped: {self.error or 'by the bridge'})" if self.lost else ""
            raise BenchError(
                f"station {self.serial}: expected request not seen in {timeout:g} s{why}"
            ) from None


async def close_stations(stations: Sequence[MiniStation]) -> None:
    """Close the connections and let the closes go out.

    Before the bridge is stopped: it would otherwise try to stop charging on a station that
    cannot answer while the bench waits for the bridge.
    """
    for station in stations:
        station.close()
    await asyncio.sleep(0.1)


def is_pwm(value: int | None = None) -> Callable[[p.Request], bool]:
    """Matches a set-PWM request (with this duty cycle, if given)."""
    return lambda r: r.type is p.RequestType.SET_PWM and (value is None or r.pwm == value)


def is_collect(r: p.Request) -> bool:
    """Matches a collect-data request."""
    return r.type is p.RequestType.COLLECT_DATA


async def registered(station: MiniStation, timeout: float = 10.0) -> None:
    """Wait for the bridge's first collect-data (it registers the station after the answer)."""
    await station.expect(is_collect, timeout)


# --- part 1: Modbus throughput ------------------------------------------------------------------


@dataclass
class LoadResult:
    """One Modbus load run."""

    server: str
    clients: int
    seconds: float
    generator: str = "python"
    latencies: list[float] = field(default_factory=list)  # python: every request's latency
    summary: dict[str, float] = field(default_factory=dict)  # C: requests, p50_us, p99_us, max_us
    errors: int = 0
    server_cpu: float = 0.0
    bench_cpu: float = 0.0

    @property
    def requests(self) -> int:
        """Requests answered in the measured window."""
        return int(self.summary["requests"]) if self.summary else len(self.latencies)

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds

    def latency(self, q: float | None) -> float:
        """Percentile ``q`` of the latency in seconds (None: the maximum)."""
        if self.summary:
            key = "max_us" if q is None else f"p{q:g}_us"
            return self.summary[key] / 1e6 if self.requests else math.nan
        if q is None:
            return max(self.latencies, default=math.nan)
        return percentile(self.latencies, q)

    @property
    def server_us_per_request(self) -> float:
        """Server CPU time per request in microseconds."""
        return self.server_cpu / 100 / self.rate * 1e6 if self.requests else math.nan

    def row(self) -> list[object]:
        """Row of the Modbus table."""
        return [
            self.server,
            self.clients,
            self.requests,
            f"{self.rate:.0f}",
            ms(self.latency(50)),
            ms(self.latency(99)),
            ms(self.latency(None)),
            self.errors,
            f"{self.server_cpu:.0f}",
            f"{self.server_us_per_request:.0f}",
            f"{self.bench_cpu:.0f}",
        ]


async def measure_cpu(result: LoadResult, server: Child, start: float, end: float) -> None:
    """Fill in the server's and the bench's CPU use between ``start`` and ``end``."""
    await asyncio.sleep(start - time.perf_counter())
    meter = CpuMeter(server)
    await asyncio.sleep(end - time.perf_counter())
    result.server_cpu, result.bench_cpu = meter.percent()


async def modbus_load(
    name: str, port: int, server: Child, clients: int, warmup: float, duration: float
) -> LoadResult:
    """``clients`` connections reading LP1's block back to back; measured after ``warmup``.

    With the C load generator (``make bench`` builds it) one thread per connection in a child
    process; otherwise pymodbus clients in this process, which are slower than the servers.
    """
    if C_CLIENT.exists():
        return await c_modbus_load(name, port, server, clients, warmup, duration)
    connections = [await modbus_client(port) for _ in range(clients)]
    result = LoadResult(name, clients, duration)
    start = time.perf_counter() + warmup
    end = start + duration

    async def reader(client: AsyncModbusTcpClient) -> None:
        while True:
            t0 = time.perf_counter()
            ok = await read_block(client)
            t1 = time.perf_counter()
            if t1 > end:
                return
            if t0 >= start:
                result.latencies.append(t1 - t0)
                result.errors += not ok

    try:
        await asyncio.gather(
            measure_cpu(result, server, start, end), *(reader(c) for c in connections)
        )
    finally:
        for client in connections:
            client.close()
    return result


def c_client_argv(port: int, clients: int, warmup: float, duration: float) -> list[str]:
    """The C load generator's command line (bench/bench_client.c)."""
    return [
        str(C_CLIENT),
        HOST,
        str(port),
        str(clients),
        f"{duration:g}",
        f"{warmup:g}",
        str(BLOCK_START),
        str(BLOCK_SIZE),
        str(DEVICE_ID),
    ]


async def c_modbus_load(
    name: str, port: int, server: Child, clients: int, warmup: float, duration: float
) -> LoadResult:
    """:func:`modbus_load` with the C load generator."""
    result = LoadResult(name, clients, duration, generator="C")
    start = time.perf_counter() + warmup
    proc = await asyncio.create_subprocess_exec(
        *c_client_argv(port, clients, warmup, duration), stdout=subprocess.PIPE
    )
    try:
        await measure_cpu(result, server, start, start + duration)
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"{C_CLIENT} failed against {name} (exit code {proc.returncode})")
    result.summary = {k: float(v) for k, v in (f.split("=") for f in out.decode().split())}
    result.errors = int(result.summary["errors"])
    return result


async def start_libmodbus_server(workdir: Path) -> tuple[Child, int]:
    """The reference libmodbus server (bench/bench_server.c) serving a static block."""
    port = free_port()
    argv = [str(C_SERVER), HOST, str(port), str(BLOCK_START), str(BLOCK_SIZE)]
    child = Child("libmodbus server", argv, workdir / "libmodbus.log")
    await wait_listening(port, child)
    return child, port


async def bench_modbus(args: argparse.Namespace, workdir: Path) -> None:
    """Part 1: the bridge, a plain pymodbus server and a libmodbus server under one read load."""
    results: list[LoadResult] = []
    say("modbus: starting the bridge and one virtual station")
    bridge = await start_bridge(workdir, "modbus")
    station = VirtualStation(
        virtual_serial(1),
        bridge=(HOST, bridge.evse_port),
        vehicle=VehicleConfig(plug_in_after=0.0, reaction_s=0.05),
    )
    await station.start()
    try:
        probe = await modbus_client(bridge.modbus_port)
        await wait_for_lp(probe)
        # A charging vehicle, so that the bridge serves (and encodes) real measurements.
        await write_current(probe, 1600)
        probe.close()
        for n in args.clients:
            say(f"modbus: bridge, {n} client(s), {args.warmup:g} + {args.duration:g} s")
            results.append(
                await modbus_load(
                    "bridge", bridge.modbus_port, bridge.child, n, args.warmup, args.duration
                )
            )
    finally:
        await station.stop()
        bridge.child.stop()

    references = [("plain", start_plain_server)]
    if C_SERVER.exists():
        references.append(("libmodbus", start_libmodbus_server))
    for name, start in references:
        say(f"modbus: starting the {name} server")
        server, port = await start(workdir)
        try:
            for n in args.clients:
                say(f"modbus: {name} server, {n} client(s), {args.warmup:g} + {args.duration:g} s")
                results.append(await modbus_load(name, port, server, n, args.warmup, args.duration))
        finally:
            server.stop()

    order = {"bridge": 0, "plain": 1, "libmodbus": 2}
    results.sort(key=lambda r: (r.clients, order[r.server]))
    rate = {(r.server, r.clients): r.rate for r in results}
    ratios = [
        f"bridge / {ref} at {n} client(s): {rate['bridge', n] / rate[ref, n]:.2f}x"
        for n in args.clients
        for ref, _ in references
    ]
    headers = [
        "server",
        "clients",
        "requests",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors",
        "server CPU %",
        "server CPU us/req",
        "bench CPU %",
    ]
    if C_CLIENT.exists():
        argv = c_client_argv(0, 0, args.warmup, args.duration)
        argv[2:4] = ["PORT", "CLIENTS"]
        generator = (
            f"load: {' '.join(argv)} (bench/bench_client.c: libmodbus, one thread and "
            "connection per client)"
        )
    else:
        generator = (
            f"load: pymodbus clients in the bench process ({C_CLIENT} is missing: it, not the "
            "server, limits the rates; run make bench, which builds it with libmodbus-dev)"
        )
    section(
        f"1. Modbus reads: FC4, {BLOCK_SIZE} registers from {BLOCK_START}, "
        f"{args.duration:g} s each after {args.warmup:g} s warm-up",
        table(headers, [r.row() for r in results]),
        [
            f"bridge: {bridge.options}",
            "  one virtual station on LP1, vehicle charging at 16 A (set current 1600)",
            f"plain:  python -m bench --plain-server PORT (pymodbus SimDevice id "
            f"{DEVICE_ID}, static block of {BLOCK_SIZE} registers)",
            *(
                [f"libmodbus: {C_SERVER} {HOST} PORT {BLOCK_START} {BLOCK_SIZE} (static block)"]
                if C_SERVER.exists()
                else []
            ),
            generator,
            "CPU % is of one core.",
            *ratios,
        ],
    )


# --- part 2: write-to-PWM latency ---------------------------------------------------------------


async def bench_latency(args: argparse.Namespace, workdir: Path) -> None:
    """Part 2: from the write of the set-current register to set-PWM on the station socket."""
    say(f"latency: {args.writes} writes of the set-current register")
    bridge = await start_bridge(workdir, "latency")
    station = MiniStation(virtual_serial(1), record=True)
    client: AsyncModbusTcpClient | None = None
    try:
        await station.connect(bridge.evse_port)
        await registered(station)
        client = await modbus_client(bridge.modbus_port)
        await wait_for_lp(client)
        steps = [(1600, 1600 // CA_PER_PWM_PERCENT), (1000, 1000 // CA_PER_PWM_PERCENT)]
        to_pwm: list[float] = []
        write_rtt: list[float] = []
        pwm_first = 0
        for i in range(args.writes):
            centiamps, pwm = steps[i % 2]
            station.drain()
            t0 = time.perf_counter()
            await write_current(client, centiamps)
            t1 = time.perf_counter()
            at, request = await station.expect(is_pwm(), timeout=5.0)
            if request.pwm != pwm:
                raise BenchError(f"wrote {centiamps}, expected PWM {pwm}, got {request.pwm}")
            to_pwm.append(at - t0)
            write_rtt.append(t1 - t0)
            pwm_first += at < t1
            # The bridge confirms with a collect-data; the next write starts from a calm state.
            await station.expect(is_collect, timeout=5.0)
    finally:
        if client is not None:
            client.close()
        await close_stations([station])
        bridge.child.stop()

    rows = [
        [
            "write -> set-PWM on station",
            *(ms(percentile(to_pwm, q)) for q in (50, 99)),
            ms(max(to_pwm)),
        ],
        [
            "write -> Modbus response",
            *(ms(percentile(write_rtt, q)) for q in (50, 99)),
            ms(max(write_rtt)),
        ],
    ]
    section(
        f"2. Write {SET_CURRENT} (FC6) -> set-PWM command on the station socket, "
        f"{args.writes} writes alternating 1600/1000 (PWM {steps[0][1]}/{steps[1][1]})",
        table(["interval", "p50 ms", "p99 ms", "max ms"], rows),
        [
            f"bridge: {bridge.options}",
            "  a minimal station in the bench process (pilot B, 32 A cable) timestamps requests "
            "on arrival",
            f"set-PWM arrived before the write's Modbus response in {pwm_first} of {args.writes}",
        ],
    )


# --- part 2b: MQTT command-to-PWM latency ------------------------------------------------------


async def start_mosquitto(workdir: Path) -> tuple[Child, int]:
    """A mosquitto on a free loopback port (Debian's, from /usr/sbin)."""
    path = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        raise BenchError("the mqtt part needs mosquitto (apt-get install mosquitto)")
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    child = Child("mosquitto", [path, "-c", str(config)], workdir / "mosquitto.log")
    await wait_listening(port, child)
    return child, port


async def bench_mqtt(args: argparse.Namespace, workdir: Path) -> None:
    """Part 2b: from an MQTT set_current publish to set-PWM on the station socket."""
    import aiomqtt

    say(f"mqtt: {args.writes} set_current commands over MQTT")
    broker, mqtt_port = await start_mosquitto(workdir)
    bridge = await start_bridge(
        workdir,
        "mqtt",
        *("--mqtt-host", HOST, "--mqtt-port", str(mqtt_port), "--controller", "openwb-mqtt"),
    )
    station = MiniStation(virtual_serial(1), record=True)
    base = "openWB/set/internal_chargepoint/"
    to_pwm: list[float] = []
    try:
        await station.connect(bridge.evse_port)
        await registered(station)
        # One client for the commands, so the figure is the service's path, not openWB's
        # connection set-up (it opens one per publish).
        async with aiomqtt.Client(HOST, mqtt_port) as client:
            await client.subscribe("openWB/internal_chargepoint/0/get/fault_state")
            async with asyncio.timeout(15):  # ready: connected, station seen, heartbeat fresh
                async for message in client.messages:
                    if message.payload == b"0":
                        break
                    beat = f'{{"heartbeat": {time.time()}}}'
                    await client.publish(base + "global_data", beat, retain=True)
            steps = [(16, 16 * 100 // CA_PER_PWM_PERCENT), (10, 10 * 100 // CA_PER_PWM_PERCENT)]
            for i in range(args.writes):
                amps, pwm = steps[i % 2]
                station.drain()
                t0 = time.perf_counter()
                await client.publish(base + "0/data/set_current", str(amps), retain=True)
                at, request = await station.expect(is_pwm(), timeout=5.0)
                if request.pwm != pwm:
                    raise BenchError(f"sent {amps} A, expected PWM {pwm}, got {request.pwm}")
                to_pwm.append(at - t0)
                await station.expect(is_collect, timeout=5.0)
    finally:
        await close_stations([station])
        bridge.child.stop()
        broker.stop()

    rows = [
        [
            "MQTT publish -> set-PWM on station",
            *(ms(percentile(to_pwm, q)) for q in (50, 99)),
            ms(max(to_pwm)),
        ]
    ]
    section(
        f"2b. openWB set_current over MQTT -> set-PWM command on the station socket, "
        f"{args.writes} commands alternating 16/10 A (PWM {steps[0][1]}/{steps[1][1]}); "
        "compare with part 2",
        table(["interval", "p50 ms", "p99 ms", "max ms"], rows),
        [
            f"bridge: {bridge.options}",
            "  through a mosquitto on loopback; the primary's client stays connected",
        ],
    )


# --- part 2c: Rust-bridge messages ----------------------------------------------------------------


async def bench_bridge(args: argparse.Namespace, workdir: Path) -> None:
    """Part 2c: request_set_pwm_percent -> set-PWM and response; poll -> response_collect_data."""
    import aiomqtt

    say(f"bridge: {args.writes} request_set_pwm_percent over MQTT")
    broker, mqtt_port = await start_mosquitto(workdir)
    bridge = await start_bridge(
        workdir,
        "bridge",
        *("--mqtt-host", HOST, "--mqtt-port", str(mqtt_port), "--controller", "bridge-mqtt"),
        *("--bridge-topics", "from_dehneEVSE,to_dehneEVSE"),
    )
    serial = virtual_serial(1)
    station = MiniStation(serial, record=True)
    to_pwm: list[float] = []
    to_response: list[float] = []
    poll_to_message: list[float] = []
    try:
        async with aiomqtt.Client(HOST, mqtt_port) as client:
            await client.subscribe("from_dehneEVSE")
            messages = client.messages

            async def next_of(kind: str) -> float:
                async with asyncio.timeout(5):
                    async for message in messages:
                        if json.loads(message.payload)["message_type"] == kind:
                            return time.perf_counter()
                raise BenchError(f"no {kind}")

            await asyncio.sleep(1.0)  # the service's MQTT client connects
            await station.connect(bridge.evse_port)
            await registered(station)
            await next_of("new_connection")
            for i in range(args.writes):
                percent = (26, 16)[i % 2]
                request = {
                    "message_type": "request_set_pwm_percent",
                    "client_id": serial,
                    "pwm_percent": percent,
                }
                station.drain()
                t0 = time.perf_counter()
                await client.publish("to_dehneEVSE", json.dumps(request))
                answered = await next_of("response_set_pwm_percent")
                at, got = await station.expect(is_pwm(), timeout=5.0)
                if got.pwm != percent:
                    raise BenchError(f"asked {percent} %, the station got PWM {got.pwm}")
                to_pwm.append(at - t0)
                to_response.append(answered - t0)
                polled, _ = await station.expect(is_collect, timeout=5.0)
                poll_to_message.append(await next_of("response_collect_data") - polled)
    finally:
        await close_stations([station])
        bridge.child.stop()
        broker.stop()

    def row(name: str, values: list[float]) -> list[str]:
        return [name, *(ms(percentile(values, q)) for q in (50, 99)), ms(max(values))]

    section(
        f"2c. Rust-bridge request_set_pwm_percent over MQTT, {args.writes} requests alternating "
        "26/16 %; compare with parts 2 and 2b",
        table(
            ["interval", "p50 ms", "p99 ms", "max ms"],
            [
                row("publish -> set-PWM on station", to_pwm),
                row("publish -> response_set_pwm_percent", to_response),
                row("collect-data on station -> response_collect_data", poll_to_message),
            ],
        ),
        [
            f"bridge: {bridge.options}",
            "  through a mosquitto on loopback; one client publishes and subscribes",
            "  the service's client and mosquitto (set_tcp_nodelay true, as mosquitto-config "
            "writes it) both turn Nagle off; with either left on the last row was ~42 ms",
        ],
    )


# --- part 3: station capacity -------------------------------------------------------------------


@dataclass
class CapacityResult:
    """One capacity run."""

    stations: int
    connect_s: float
    registered: int
    seconds: float
    polls: int
    on_time: int
    late: int
    early: int
    missed: int
    dropped: int
    intervals: list[float]
    bridge_cpu: float
    bench_cpu: float
    rss_kib: int
    peak_kib: int

    def row(self) -> list[object]:
        """Row of the capacity table."""
        return [
            self.stations,
            f"{self.connect_s:.1f}",
            self.registered,
            self.polls,
            f"{self.polls / self.seconds:.0f}",
            self.on_time,
            self.late,
            self.early,
            self.missed,
            self.dropped,
            f"{percentile(self.intervals, 50):.3f}",
            f"{percentile(self.intervals, 99):.3f}",
            f"{max(self.intervals, default=math.nan):.3f}",
            f"{self.bridge_cpu:.1f}",
            f"{self.bench_cpu:.1f}",
            f"{self.rss_kib / 1024:.0f}/{self.peak_kib / 1024:.0f}",
        ]


def chunks(items: Sequence[MiniStation], size: int) -> Iterator[Sequence[MiniStation]]:
    """``items`` in slices of ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def capacity_run(workdir: Path, n: int, duration: float) -> tuple[CapacityResult, str]:
    """Connect ``n`` stations to a fresh bridge, then watch their polls for ``duration`` s."""
    # All bench stations come from one address: lift the station caps to let every one in.
    bridge = await start_bridge(
        workdir,
        f"capacity{n}",
        "--poll-interval",
        f"{POLL_INTERVAL:g}",
        "--evse-max-connections",
        str(n + 16),
        "--evse-max-per-address",
        str(n + 16),
    )
    stations = [MiniStation(virtual_serial(i)) for i in range(1, n + 1)]
    try:
        t0 = time.perf_counter()
        for batch in chunks(stations, CONNECT_BATCH):
            await asyncio.gather(*(s.connect(bridge.evse_port) for s in batch))
        # Registered = answered the bridge's first collect-data.
        deadline = t0 + 30 + n / 20
        while any(not s.polls for s in stations) and time.perf_counter() < deadline:
            bridge.child.check_alive()
            await asyncio.sleep(0.05)
        connect_s = time.perf_counter() - t0

        start = time.perf_counter()
        meter = CpuMeter(bridge.child)
        await asyncio.sleep(duration)
        end = time.perf_counter()
        bridge_cpu, bench_cpu = meter.percent()
        rss, peak = bridge.child.memory_kib()
        dropped = sum(s.lost for s in stations)
    finally:
        await close_stations(stations)
        bridge.child.stop()

    intervals: list[float] = []
    on_time = late = early = missed = polls = 0
    for s in stations:
        times = [t for t in s.polls if t <= end]
        gaps = [b - a for a, b in itertools.pairwise(times) if b >= start]
        polls += sum(t >= start for t in times)
        intervals += gaps
        s_late = sum(g > POLL_INTERVAL + POLL_TOLERANCE for g in gaps)
        s_early = sum(g < POLL_INTERVAL - POLL_TOLERANCE for g in gaps)
        # Polls overdue at the end of the window (a station never polled counts from the start).
        tail = end - (times[-1] if times else start)
        s_missed = max(0, int((tail - POLL_TOLERANCE) // POLL_INTERVAL))
        late, early, missed = late + s_late, early + s_early, missed + s_missed
        on_time += bool(times) and not (s_late or s_early or s_missed)
    result = CapacityResult(
        stations=n,
        connect_s=connect_s,
        registered=sum(bool(s.polls) for s in stations),
        seconds=end - start,
        polls=polls,
        on_time=on_time,
        late=late,
        early=early,
        missed=missed,
        dropped=dropped,
        intervals=intervals,
        bridge_cpu=bridge_cpu,
        bench_cpu=bench_cpu,
        rss_kib=rss,
        peak_kib=peak,
    )
    return result, bridge.options


async def bench_capacity(args: argparse.Namespace, workdir: Path) -> None:
    """Part 3: stations kept polled at the default interval, with the bridge's CPU and memory."""
    results: list[CapacityResult] = []
    options = ""
    for n in args.stations:
        say(f"capacity: {n} stations, {args.capacity_duration:g} s")
        result, options = await capacity_run(workdir, n, args.capacity_duration)
        results.append(result)
    headers = [
        "stations",
        "connect s",
        "registered",
        "polls",
        "polls/s",
        "on time",
        "late",
        "early",
        "missed",
        "dropped",
        "interval p50 s",
        "p99 s",
        "max s",
        "bridge CPU %",
        "bench CPU %",
        "RSS/peak MiB",
    ]
    section(
        f"3. Station capacity: poll interval {POLL_INTERVAL:g} s, "
        f"{args.capacity_duration:g} s watched after all stations registered",
        table(headers, [r.row() for r in results]),
        [
            f"bridge: {options}  (a fresh bridge per row)",
            f"stations: minimal, in the bench process, connecting {CONNECT_BATCH} at a time; "
            "'connect s' = until all answered their first collect-data",
            f"on time: every poll interval within {POLL_INTERVAL:g} +- {POLL_TOLERANCE:g} s and "
            "none overdue at the end; late/early/missed count polls over all stations",
            "only 9 stations get an LP; the others are polled and kept safe but not served "
            "over Modbus (as designed)",
            "CPU % is of one core over the watched window; RSS/peak from /proc/PID/status at its "
            "end",
        ],
    )


# --- part 4: heartbeat --------------------------------------------------------------------------


async def bench_heartbeat(args: argparse.Namespace, workdir: Path) -> None:
    """Part 4: from the heartbeat deadline to the PWM-100 command on the station."""
    timeout = args.heartbeat_timeout
    say(f"heartbeat: {args.heartbeat_rounds} lapses with --heartbeat-timeout {timeout:g}")
    bridge = await start_bridge(workdir, "heartbeat", "--heartbeat-timeout", f"{timeout:g}")
    station = MiniStation(virtual_serial(1), requests_power=True, record=True)
    client: AsyncModbusTcpClient | None = None
    charging_pwm = 1600 // CA_PER_PWM_PERCENT
    rows: list[list[object]] = []
    delays: list[float] = []
    try:
        await station.connect(bridge.evse_port)
        await registered(station)
        client = await modbus_client(bridge.modbus_port)
        await wait_for_lp(client)
        await write_current(client, 1600)
        for i in range(1, args.heartbeat_rounds + 1):
            # Keep the heartbeat alive (this also recovers it after the previous lapse) until
            # the vehicle charges: PWM set and contactor closed.
            async with asyncio.timeout(15):
                while not (station.pwm == charging_pwm and station.contactor):
                    await read_block(client)
                    await asyncio.sleep(0.1)
            station.drain()
            sent = time.perf_counter()
            if not await read_block(client):
                raise BenchError("the last read before the lapse failed")
            answered = time.perf_counter()
            at, _ = await station.expect(is_pwm(100), timeout=timeout + 5)
            opened, _ = await station.expect(
                lambda r: r.type is p.RequestType.SET_CONTACTOR and not r.contactor,
                timeout=15,
            )
            delays.append(at - (answered + timeout))
            rows.append(
                [i, ms(answered - sent), f"{at - answered:.4f}", ms(delays[-1]), ms(opened - at)]
            )
    finally:
        if client is not None:
            client.close()
        await close_stations([station])
        bridge.child.stop()

    rows.append(["max", "", "", ms(max(delays)), ""])
    section(
        f"4. Heartbeat: last Modbus response at T, PWM 100 expected at T + {timeout:g} s "
        f"({args.heartbeat_rounds} lapses)",
        table(
            [
                "lapse",
                "last read ms",
                "T -> PWM 100 s",
                "beyond deadline ms",
                "PWM 100 -> contactor off ms",
            ],
            rows,
        ),
        [
            f"bridge: {bridge.options}",
            "  a minimal charging station (pilot C, 32 A cable, 16 A drawn while the contactor "
            "is closed), set current 1600",
            "T = when the last read's response arrived; the bridge refreshed the heartbeat "
            "just before sending it, so the delay is short by that one-way time (< 'last read')",
        ],
    )


# --- part 5: /metrics under load ----------------------------------------------------------------

SCRAPE_STATIONS = 200
SCRAPERS = 20
SCRAPE_BURST = 300
READ_EVERY = 0.02  # seconds between the controller's Modbus reads


@dataclass
class ScrapeRow:
    """One phase of the scrape part."""

    phase: str
    latencies: list[float]
    errors: int
    scrapes: dict[str, int]
    seconds: float
    bridge_cpu: float
    rss_kib: int
    peak_kib: int
    dropped: int

    def row(self) -> list[object]:
        """Row of the scrape table."""
        lat = self.latencies
        return [
            self.phase,
            len(lat),
            ms(percentile(lat, 50)),
            ms(percentile(lat, 95)),
            ms(percentile(lat, 99)),
            ms(max(lat, default=math.nan)),
            self.errors,
            f"{self.scrapes.get('200', 0) / self.seconds:.0f}" if self.scrapes else "-",
            self.scrapes.get("503", 0) if self.scrapes else "-",
            f"{self.bridge_cpu:.0f}",
            f"{self.rss_kib / 1024:.0f}/{self.peak_kib / 1024:.0f}",
            self.dropped,
        ]


def run_scrapers(count: int, url: str, seconds: float) -> None:
    """``count`` clients GET ``url`` back to back for ``seconds`` (0: once each, all at once).

    Prints the status counts as JSON, and the largest body size as ``"bytes"``.
    """
    import aiohttp

    async def scrape() -> dict[str, int]:
        statuses: dict[str, int] = {}
        end = time.perf_counter() + seconds
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                while True:
                    try:
                        async with session.get(url) as response:
                            body = await response.read()
                            key = str(response.status)
                            statuses["bytes"] = max(statuses.get("bytes", 0), len(body))
                    except (aiohttp.ClientError, TimeoutError):
                        key = "error"
                    statuses[key] = statuses.get(key, 0) + 1
                    if time.perf_counter() >= end:
                        return

            await asyncio.gather(*(one() for _ in range(count)))
        return statuses

    print(json.dumps(asyncio.run(scrape())))


async def controller_reads(client: AsyncModbusTcpClient, seconds: float) -> tuple[list[float], int]:
    """Read LP1's block every READ_EVERY s for ``seconds``; (latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            ok = await read_block(client)
        except Exception:  # a timeout counts like an exception response
            ok = False
        latencies.append(time.perf_counter() - t0)
        errors += not ok
        await asyncio.sleep(READ_EVERY)
    return latencies, errors


async def bench_scrape(args: argparse.Namespace, workdir: Path) -> None:
    """Part 5: Modbus latency while /metrics is hammered, with 200 stations."""
    metrics_port = free_port()
    # start_bridge turns /metrics off with --metrics-port 0 first; the later option wins. All
    # stations come from one loopback address: the per-address cap must let them in.
    caps = ["--evse-max-connections", "1000", "--evse-max-per-address", "1000"]
    bridge = await start_bridge(workdir, "scrape", "--metrics-port", str(metrics_port), *caps)
    url = f"http://{HOST}:{metrics_port}/metrics"
    stations = [
        MiniStation(virtual_serial(i), requests_power=True) for i in range(1, SCRAPE_STATIONS + 1)
    ]
    rows: list[ScrapeRow] = []
    size = 0
    client: AsyncModbusTcpClient | None = None
    seconds = args.duration
    try:
        for batch in chunks(stations, CONNECT_BATCH):
            await asyncio.gather(*(s.connect(bridge.evse_port) for s in batch))
        async with asyncio.timeout(30):
            while any(not s.polls for s in stations):
                await asyncio.sleep(0.05)
        client = await modbus_client(bridge.modbus_port)
        await wait_for_lp(client)
        await write_current(client, 1600)
        await asyncio.sleep(1)

        async def phase(name: str, scrapers: int, scrape_seconds: float) -> None:
            nonlocal size
            meter = CpuMeter(bridge.child)
            t0 = time.perf_counter()
            proc = None
            if scrapers:
                proc = await asyncio.create_subprocess_exec(
                    *[sys.executable, "-m", "bench", "--scrapers", str(scrapers), url],
                    f"{scrape_seconds:g}",
                    stdout=subprocess.PIPE,
                )
            assert client is not None
            latencies, errors = await controller_reads(client, seconds)
            scrapes: dict[str, int] = {}
            if proc is not None:
                out, _ = await proc.communicate()
                scrapes = json.loads(out)
                size = max(size, scrapes.pop("bytes", 0))
            elapsed = time.perf_counter() - t0
            cpu, _ = meter.percent()
            rss, peak = bridge.child.memory_kib()
            dropped = sum(s.lost for s in stations)
            rows.append(
                ScrapeRow(name, latencies, errors, scrapes, elapsed, cpu, rss, peak, dropped)
            )

        say(f"scrape: {SCRAPE_STATIONS} stations, Modbus reads every {READ_EVERY * 1000:g} ms")
        await phase("quiet", 0, 0)
        say(f"scrape: the same while {SCRAPERS} scrapers hammer /metrics")
        await phase(f"{SCRAPERS} scrapers", SCRAPERS, seconds)
        say(f"scrape: {SCRAPE_BURST} simultaneous scrapes")
        await phase(f"{SCRAPE_BURST} at once", SCRAPE_BURST, 0)
    finally:
        if client is not None:
            client.close()
        await close_stations(stations)
        bridge.child.stop()

    headers = [
        "phase",
        "reads",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "scrapes/s",
        "503s",
        "bridge CPU %",
        "RSS/peak MiB",
        "stations dropped",
    ]
    section(
        f"5. /metrics under load: {SCRAPE_STATIONS} stations, Modbus reads of LP1's block every "
        f"{READ_EVERY * 1000:g} ms, {seconds:g} s per phase",
        table(headers, [r.row() for r in rows]),
        [
            f"bridge: {bridge.options}",
            f"scrapers: python -m bench --scrapers {SCRAPERS} URL SECONDS (a subprocess, "
            "aiohttp, back to back); 503 = refused by the connection cap",
            f"exposition size {size / 1024:.0f} KiB; in the {SCRAPE_BURST}-at-once row every "
            "scraper GETs once, and scrapes/s is over the whole phase",
            "CPU % is of one core; RSS/peak from /proc/PID/status at the end of each phase",
        ],
    )


# --- part 6: idle connections -------------------------------------------------------------------

IDLE_CONNECTIONS = 1000
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, count: int) -> list[Connection]:
    """Open ``count`` connections that never send anything (a refused one is closed at once)."""
    connections = []
    for start in range(0, count, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, count - start)
        connections += await asyncio.gather(
            *(asyncio.open_connection(HOST, port) for _ in range(batch))
        )
    await asyncio.sleep(0.5)  # refusals arrive as EOF
    for reader, _ in connections:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.001)
    return connections


async def bench_idle(args: argparse.Namespace, workdir: Path) -> None:
    """Part 6: a controller's Modbus latency while 1000 idle connections are opened."""
    seconds = args.duration
    rows: list[list[object]] = []
    runs = [
        ("default caps", []),
        (
            "caps raised",
            ["--modbus-max-connections", "2000", "--modbus-max-per-address", "2000"],
        ),
    ]
    options = []
    for label, extra in runs:
        bridge = await start_bridge(workdir, f"idle-{len(rows)}", *extra)
        options.append(bridge.options)
        station = MiniStation(virtual_serial(1), requests_power=True)
        client: AsyncModbusTcpClient | None = None
        idle: list[Connection] = []
        try:
            await station.connect(bridge.evse_port)
            client = await modbus_client(bridge.modbus_port)
            await wait_for_lp(client)
            await write_current(client, 1600)
            phases = [("quiet", 0), (f"{IDLE_CONNECTIONS} idle, {label}", IDLE_CONNECTIONS)]
            for name, count in phases:
                say(f"idle: {name}, Modbus reads every {READ_EVERY * 1000:g} ms for {seconds:g} s")
                idle += await open_idle(bridge.modbus_port, count)
                meter = CpuMeter(bridge.child)
                latencies, errors = await controller_reads(client, seconds)
                cpu, _ = meter.percent()
                held = sum(not reader.at_eof() for reader, _ in idle)
                rows.append(
                    [
                        name,
                        len(latencies),
                        *(ms(percentile(latencies, q)) for q in (50, 95, 99)),
                        ms(max(latencies, default=math.nan)),
                        errors,
                        f"{held}/{len(idle)}" if idle else "-",
                        f"{cpu:.0f}",
                        int(station.lost),
                    ]
                )
        finally:
            for _, writer in idle:
                writer.close()
            if client is not None:
                client.close()
            await close_stations([station])
            bridge.child.stop()
    headers = [
        "phase",
        "reads",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "errors",
        "idle held open",
        "bridge CPU %",
        "station dropped",
    ]
    section(
        f"6. Idle Modbus connections: reads of LP1's block every {READ_EVERY * 1000:g} ms, "
        f"{seconds:g} s per phase, {IDLE_CONNECTIONS} connections opened that never send",
        table(headers, rows),
        [
            *(f"bridge: {o}" for o in options),
            "  one minimal charging station; the controller's connection is opened first",
            "idle held open: connections the bridge kept (the rest were refused at accept by "
            "modbus_max_connections / modbus_max_per_address, all from one address here)",
        ],
    )


# --- main ---------------------------------------------------------------------------------------


def conditions(args: argparse.Namespace, parts: Sequence[str]) -> str:
    """The conditions of this run, for the report header."""
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((r.split(":", 1)[1].strip() for r in f if r.startswith("model name")), model)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        (
            "CPU",
            f"{os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), {model}",
        ),
        ("load average", f"{load} (1/5/15 min, at start)"),
        ("OS", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("pymodbus", importlib.metadata.version("pymodbus")),
        ("bitstring", importlib.metadata.version("bitstring")),
        ("openwb-modbus-evse", importlib.metadata.version("openwb-modbus-evse")),
        ("parts", ", ".join(parts)),
        (
            "settings",
            f"--duration {args.duration:g} --warmup {args.warmup:g} "
            f"--clients {','.join(map(str, args.clients))} --writes {args.writes} "
            f"--stations {','.join(map(str, args.stations))} "
            f"--capacity-duration {args.capacity_duration:g} "
            f"--heartbeat-rounds {args.heartbeat_rounds} "
            f"--heartbeat-timeout {args.heartbeat_timeout:g}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def int_list(text: str) -> list[int]:
    """``"100,500"`` -> [100, 500]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def part_list(text: str) -> list[str]:
    """``"modbus,latency"`` -> the parts, checked."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; got {text!r}")
    return [x for x in PARTS if x in parts]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the openWB Modbus <-> Dehne-EVSE bridge (about 2.5 min by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--only",
        type=part_list,
        default=",".join(PARTS),
        help=f"parts to run, of {','.join(PARTS)}",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds measured per Modbus load run"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument(
        "--clients", type=int_list, default="1,8", help="concurrent Modbus clients per run"
    )
    parser.add_argument("--writes", type=int, default=200, help="writes in the latency part")
    parser.add_argument(
        "--stations", type=int_list, default="100,1000,2000", help="station counts to try"
    )
    parser.add_argument(
        "--capacity-duration", type=float, default=30.0, help="seconds watched per station count"
    )
    parser.add_argument(
        "--heartbeat-rounds", type=int, default=5, help="heartbeat lapses to measure"
    )
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=2.0, help="the bridge's --heartbeat-timeout"
    )
    parser.add_argument(
        "--plain-server",
        type=int,
        metavar="PORT",
        help="only run the plain pymodbus reference server on PORT (used by the bench itself)",
    )
    parser.add_argument(
        "--scrapers",
        nargs=3,
        metavar=("N", "URL", "SECONDS"),
        help="only run N scrapers of URL for SECONDS (used by the bench itself)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, workdir: Path) -> None:
    """Every selected part, in order."""
    # SIGTERM cancels like Ctrl-C does, so that every finally block stops its subprocesses.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    benches = {
        "modbus": bench_modbus,
        "latency": bench_latency,
        "mqtt": bench_mqtt,
        "bridge": bench_bridge,
        "capacity": bench_capacity,
        "heartbeat": bench_heartbeat,
        "scrape": bench_scrape,
        "idle": bench_idle,
    }
    for part in args.only:
        await benches[part](args, workdir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; exit code 0 on success."""
    args = parse_args(argv)
    if args.plain_server is not None:
        run_plain_server(args.plain_server)
        return 0
    if args.scrapers is not None:
        count, url, seconds = args.scrapers
        run_scrapers(int(count), url, float(seconds))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pymodbus logs every closed connection; the simulator every (re)connect.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    # A thousand stations need a thousand sockets here and in the bridge (which inherits this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * max(args.stations) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    print("openwb-modbus-evse bench")
    print(conditions(args, args.only), flush=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="openwb-bench-") as tmp:
        try:
            asyncio.run(run(args, Path(tmp)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            say("interrupted")
            return 130
        except BenchError as err:
            say(f"bench failed: {err}")
            return 1
        finally:
            Child.stop_all()
    print(f"\ntotal time {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
