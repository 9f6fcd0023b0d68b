"""The attacks of issue 19 ("Hostile peers on the LAN, round two"), with figures to compare.

Run from the repo root: ``python -m bench.hostile [--source DIR] [--only 1,5]``. The service under
test is ``python -m openwb_modbus_evse serve --config <tmp toml>`` started with cwd and PYTHONPATH
``DIR`` (default: this checkout), so the same command measures an old checkout
(``git worktree add /tmp/before 9e18aee``) and the current one. Everything that attacks (fake
stations, Modbus, HTTP and MQTT clients) runs in this process from this checkout; a real mosquitto
carries the MQTT items.

Every figure is an observation from outside: what the service's log file holds, the CPU time of its
process (/proc/PID/stat), what a station sees on its wire, what a client gets back. Nothing reads
the service's code or state, so one command is fair to every version. The config uses only keys
that the old service knows too (it refuses unknown keys).

Client sockets bind to different loopback addresses (Linux routes all of 127.0.0.0/8 to lo), so
that one machine plays many peers on the LAN. Floods last ATTACK_SECONDS each; the whole run takes
about 90 s. ``--keep DIR`` keeps the configs and the service logs.

Where the issue leaves the attack open:

- Refused Modbus writes come twice: from an address that may not write, and from the controller's
  address with a value out of range (5000 = 50 A); the old service logged every write of the
  second kind only.
- The accepted-write floods write each value after the last answer (a value in turn, 6 A and
  32 A): the service could act on every one. Pipelined writes are used for the refused ones.
- Fair shares: 20 addresses (the issue's closing question), more than the 9 that suffice.
- LP squatting: 250 fake stations, more than every LP of any version (9 on the old one, 243 now),
  with connection caps that hold them all: the attack fills the LP table whatever its size.
- The MQTT items publish on the default tree of LP1 (``openWB/set/internal_chargepoint/0/...``)
  from a client other than the primary; the primary sends a heartbeat every second and its set
  current every other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import aiomqtt

from bench.processes import HOST, Child, start_mosquitto, wait_listening
from bench.report import BenchError, percentile, say
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.evse.connection import NEED_DATA, Connection, Notify, Response, Role
from tests.ports import free_port

ITEMS = (1, 2, 3, 4, 5, 6)
ATTACK_SECONDS = 3.0  # each flood
SERVED_TIMEOUT = 5.0  # how long a station or client waits to count as served / answered
ADMIN_TOKEN = "hostile-bench-admin-token-0123456789"
FIRMWARE = 4

# Register offsets of an LP block (register_map.csv): the same in every version.
ENERGY, SERIAL_NUMBER, SET_CURRENT = 2, 50, 71

# The stations' IDs. The real station's looks random: the public-bits figure looks for any run of
# its hex digits in what the service shows.
REAL_ID = "5A17C0DE9F3B44E1A8D2607B1C9E4F25"
STATION_A = "A0000000000000000000000000000001"
STATION_B = "B0000000000000000000000000000002"
STATION_C = "C0000000000000000000000000000003"
STATION_N = "D0000000000000000000000000000004"
STATION_NEW = "E0000000000000000000000000000005"


def addr(n: int) -> str:
    """The n-th loopback address, 127.0.0.n: a peer of its own."""
    return f"127.0.0.{n}"


# --- results --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the report."""

    item: int
    attack: str
    measure: str
    value: str


@dataclass
class Report:
    """The rows so far, printed as one table at the end."""

    items: set[int]
    rows: list[Row] = field(default_factory=list)

    def add(self, item: int, attack: str, measure: str, value: object) -> None:
        """Record one figure (and show it at once on stderr); item 0 is the setup's."""
        if item and item not in self.items:
            return  # an attack that serves two items, of which only the other was asked for
        self.rows.append(Row(item, attack, measure, str(value)))
        say(f"{item} {attack}: {measure} = {value}")

    def print(self, header: str) -> None:
        """The table on stdout."""
        cells = [("item", "attack", "measure", "value")]
        cells += [(str(r.item), r.attack, r.measure, r.value) for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]
        print(header)
        for n, row in enumerate(cells):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))
        sys.stdout.flush()


def yes_no(flag: bool) -> str:
    """A yes/no cell."""
    return "yes" if flag else "no"


def after(seconds: float | None, limit: float) -> str:
    """``after 1.2 s``, or ``not within N s`` for None."""
    return f"not within {limit:g} s" if seconds is None else f"after {seconds:.1f} s"


# --- the service under test -----------------------------------------------------------------------


def toml_value(value: object) -> str:
    """A TOML value for a str, bool, number or list of str (JSON strings are TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


class Service:
    """``python -m openwb_modbus_evse serve --config FILE`` from the source tree under test."""

    def __init__(self, source: Path, workdir: Path, name: str, **settings: object) -> None:
        self.source, self.workdir, self.name = source, workdir, name
        self.evse_port, self.modbus_port, self.http_port = free_port(), free_port(), free_port()
        self.config = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        values: dict[str, object] = {
            "evse_host": HOST,
            "evse_port": self.evse_port,
            "modbus_host": HOST,
            "modbus_port": self.modbus_port,
            "metrics_host": HOST,
            "metrics_port": self.http_port,
            "state_db": str(workdir / f"{name}.sqlite3"),
            "log_level": "INFO",  # the default: the log figures are what an owner's log gets
            "poll_interval": 1.0,
            "lp_remember_after": 1.0,
            "heartbeat_timeout": 600.0,  # the Modbus heartbeat must not lapse during a run
            "admin_token": ADMIN_TOKEN,
            **settings,
        }
        self.config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        self.child: Child | None = None
        self.starts = 0

    async def start(self) -> None:
        """Start it (again: same config and state file) and wait until every port listens."""
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the checkout under test as it is
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(self.source), env.get("PYTHONPATH", "")) if x
        )
        self.starts += 1
        log = self.workdir / f"{self.name}.{self.starts}.log"
        argv = [sys.executable, "-m", "openwb_modbus_evse", "serve", "--config", str(self.config)]
        self.child = Child(f"service ({self.name})", argv, log, cwd=self.source, env=env)
        self.log_path = log
        for port in (self.evse_port, self.modbus_port, self.http_port):
            await wait_listening(port, self.child, timeout=20.0)

    async def stop(self) -> None:
        """SIGTERM (then SIGKILL), without blocking the loop."""
        if self.child is not None:
            child, self.child = self.child, None
            await asyncio.to_thread(child.stop, 10.0)

    def window(self) -> Window:
        """Start measuring the log and the CPU time from now."""
        assert self.child is not None
        return Window(self.child, self.log_path)

    def log_text(self) -> str:
        """The whole log of the current run."""
        return self.log_path.read_text("utf-8", "replace")


@dataclass
class Measured:
    """What the service did during a window."""

    seconds: float
    log_bytes: int
    log_lines: int
    tracebacks: int
    cpu_percent: float

    @property
    def bytes_per_s(self) -> str:
        """Log bytes per second, readable."""
        rate = self.log_bytes / self.seconds
        return f"{rate / 1000:.1f} KB/s" if rate >= 1000 else f"{rate:.0f} B/s"

    @property
    def lines_per_s(self) -> str:
        """Log lines per second."""
        return f"{self.log_lines / self.seconds:.1f}"


class Window:
    """The service's log growth and CPU time over an attack."""

    def __init__(self, child: Child, log_path: Path) -> None:
        self._child, self._log = child, log_path
        self._offset = log_path.stat().st_size
        self._began = time.perf_counter()
        self._cpu = child.cpu_seconds()

    async def end(self, seconds: float | None = None) -> Measured:
        """The figures; ``seconds`` (default: the time since the start) divides the rates.

        The log is read half a second after the attack, for the lines still on their way.
        """
        elapsed = time.perf_counter() - self._began
        cpu = self._child.cpu_seconds() - self._cpu
        await asyncio.sleep(0.5)
        with open(self._log, "rb") as f:
            f.seek(self._offset)
            new = f.read()
        return Measured(
            seconds=seconds or elapsed,
            log_bytes=len(new),
            log_lines=new.count(b"\n"),
            tracebacks=new.count(b"Traceback (most recent call last)"),
            cpu_percent=100 * cpu / elapsed,
        )


def p99_ms(latencies: Sequence[float]) -> str:
    """The 99th percentile in milliseconds, with the number of reads."""
    if not latencies:
        return "no reads"
    value = percentile(latencies, 99)
    shown = "unanswered" if math.isinf(value) else f"{value * 1000:.1f} ms"
    return f"{shown} ({len(latencies)} reads)"


def report_flood(report: Report, item: int, attack: str, m: Measured) -> None:
    """The usual figures of a flood."""
    report.add(item, attack, "log bytes/s", m.bytes_per_s)
    report.add(item, attack, "log lines/s", m.lines_per_s)
    report.add(item, attack, "tracebacks in the log", m.tracebacks)
    report.add(item, attack, "service CPU %", f"{m.cpu_percent:.0f}")


# --- a station ------------------------------------------------------------------------------------


class Station(asyncio.Protocol):
    """A Dehne-EVSE station with a plugged vehicle, recording what the service sends it.

    ``draws``: the vehicle requests power and draws 16 A per phase while the contactor is closed
    and a current is offered. ``lies``: it reports a closed contactor and 16 A whatever it is told
    (an impostor that wants to move the energy counter). ``notifies``: a notify after every data
    report. ``handshake=False``: connects and never says who it is (a half-open connection).
    """

    def __init__(
        self,
        serial: str,
        *,
        draws: bool = False,
        lies: bool = False,
        notifies: bool = False,
        handshake: bool = True,
    ) -> None:
        self.serial = serial
        self.draws, self.lies, self.notifies, self.handshake = draws, lies, notifies, handshake
        self.pwm = 100
        self.contactor = False
        self.polls = 0
        self.pwm_changes = 0
        self.offers = 0  # set-PWM requests that offer a current (0 < duty < 100)
        self.stops = 0  # set-PWM requests that end an offer
        self.polled = asyncio.Event()
        self.closed = asyncio.Event()
        self._conn = Connection(Role.STATION)
        self._transport: asyncio.Transport | None = None

    async def connect(self, port: int, local: str, timeout: float = 5.0) -> None:
        """Connect from ``local`` to the service's station port."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: self, HOST, port, local_addr=(local, 0))

    def close(self) -> None:
        """Drop the connection."""
        if self._transport is not None:
            self._transport.close()

    @property
    def offering(self) -> bool:
        """The last set PWM offers a current."""
        return 0 < self.pwm < 100

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self.handshake:
            transport.write(self._conn.send(p.Handshake(self.serial, FIRMWARE)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        self._conn.receive_data(data)
        try:
            while (request := self._conn.next_event()) is not NEED_DATA:
                assert isinstance(request, p.Request)
                self._answer(request)
        except (p.ProtocolError, ValueError):
            self.close()

    def _answer(self, request: p.Request) -> None:
        assert self._transport is not None
        if request.type is p.RequestType.COLLECT_DATA:
            self.polls += 1
            self.polled.set()
            self._transport.write(self._conn.send(Response(request, self._data())))
            if self.notifies:
                self._transport.write(self._conn.send(Notify()))
            return
        if request.type is p.RequestType.SET_PWM:
            assert request.pwm is not None
            if request.pwm != self.pwm:
                self.pwm_changes += 1
            self.stops += self.offering and not 0 < request.pwm < 100
            self.pwm = request.pwm
            self.offers += self.offering
        elif request.type is p.RequestType.SET_CONTACTOR:
            assert request.contactor is not None
            self.contactor = request.contactor
        elif request.type is not p.RequestType.PING:
            return  # a firmware upload: never answered
        self._transport.write(self._conn.send(Response(request)))

    def _data(self) -> p.StationData:
        drawing = self.lies or (self.draws and self.contactor and self.offering)
        amps_ma = 16_000 if drawing else 0
        pilot = p.Pilot.C_6V if (self.draws or self.lies) else p.Pilot.B_9V
        return p.StationData(
            contactor=self.contactor or self.lies,
            pwm=self.pwm,
            pilot=pilot,
            proximity=p.Proximity.CABLE_32A,
            voltages_mv=(230_000, 230_000, 230_000),
            currents_ma=(amps_ma, amps_ma, amps_ma),
            rssi_dbm=-60,
            uptime_ms=int(time.monotonic() * 1000) % p.INT32_MAX,
            cp_adc=2720 if pilot is p.Pilot.C_6V else 3310,
            pp_adc=1130,
        )


async def connect_station(station: Station, port: int, local: str) -> bool:
    """Connect; True once the service polls it within SERVED_TIMEOUT."""
    try:
        await station.connect(port, local)
    except (OSError, TimeoutError):
        return False
    return await wait_event(station.polled, SERVED_TIMEOUT)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True if ``event`` is set within ``timeout`` s."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def wait_until(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``check()`` holds (polled every 50 ms), None after ``timeout``."""
    began = time.perf_counter()
    while not check():
        if time.perf_counter() - began > timeout:
            return None
        await asyncio.sleep(0.05)
    return time.perf_counter() - began


# --- a raw Modbus TCP client ----------------------------------------------------------------------


def lp_address(lp: int, offset: int) -> tuple[int, int]:
    """(unit ID, address) of a register of LP ``lp``: LP10 and up at the next unit IDs."""
    return 1 + (lp - 1) // 9, 10000 + 100 * ((lp - 1) % 9 + 1) + offset


class Modbus:
    """Modbus TCP frames on a plain socket: pipelining and garbage are the point."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._tid = 0

    @classmethod
    async def open(cls, port: int, local: str, timeout: float = 3.0) -> Modbus:
        """Connect from ``local``."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(local, 0))
        return cls(reader, writer)

    def frame(self, unit: int, function: int, body: bytes) -> bytes:
        """One request (MBAP header and PDU)."""
        self._tid = (self._tid + 1) & 0xFFFF
        return struct.pack(">HHHBB", self._tid, 0, len(body) + 2, unit, function) + body

    def write(self, lp: int, offset: int, value: int) -> bytes:
        """FC 6 to a register of an LP."""
        unit, address = lp_address(lp, offset)
        return self.frame(unit, 6, struct.pack(">HH", address, value))

    def read(self, lp: int, offset: int, count: int) -> bytes:
        """FC 3 of registers of an LP."""
        unit, address = lp_address(lp, offset)
        return self.frame(unit, 3, struct.pack(">HH", address, count))

    async def answers(self, count: int, timeout: float) -> list[bytes]:
        """Up to ``count`` answers (their PDUs) that arrive within ``timeout`` s."""
        got: list[bytes] = []
        with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
            async with asyncio.timeout(timeout):
                while len(got) < count:
                    header = await self.reader.readexactly(7)
                    length = struct.unpack(">H", header[4:6])[0]
                    got.append(await self.reader.readexactly(length - 1))
        return got

    async def call(self, request: bytes, timeout: float = SERVED_TIMEOUT) -> bytes | None:
        """Send one request; its answer's PDU, or None (no answer, or closed)."""
        with contextlib.suppress(OSError):
            self.writer.write(request)
            await self.writer.drain()
            got = await self.answers(1, timeout)
            return got[0] if got else None
        return None

    async def registers(self, lp: int, offset: int, count: int) -> list[int] | None:
        """Read registers; None if refused or not answered."""
        pdu = await self.call(self.read(lp, offset, count))
        if pdu is None or pdu[0] != 3 or len(pdu) != 2 + 2 * count:
            return None
        return list(struct.unpack(f">{count}H", pdu[2:]))

    def close(self) -> None:
        """Close the socket."""
        self.writer.close()


async def modbus_answers(port: int, local: str, request: Callable[[Modbus], bytes]) -> bool:
    """A new client from ``local`` sends one request: True if it is answered in time."""
    try:
        client = await Modbus.open(port, local)
    except (OSError, TimeoutError):
        return False
    try:
        return await client.call(request(client)) is not None
    finally:
        client.close()


async def energy_wh(port: int, lp: int = 1) -> int | None:
    """The energy register of an LP, read by a controller at 127.0.0.1."""
    client = await Modbus.open(port, addr(1))
    try:
        words = await client.registers(lp, ENERGY, 2)
    finally:
        client.close()
    return None if words is None else (words[0] << 16) | words[1]


# --- raw HTTP -------------------------------------------------------------------------------------


@dataclass
class HttpAnswer:
    """Status (None: no answer), headers (lower-case names), body."""

    status: int | None
    headers: dict[str, str]
    body: bytes


async def http_get(
    port: int, path: str, *, host: str | None = None, local: str = HOST, timeout: float = 5.0
) -> HttpAnswer:
    """One GET on a connection of its own (Connection: close)."""
    host = host or f"{HOST}:{port}"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(local, 0))
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                raw = await reader.read(-1)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return HttpAnswer(None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2 or not parts[1].isdigit():
        return HttpAnswer(None, {}, raw)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpAnswer(int(parts[1]), headers, body)


Idle = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, local: str, count: int) -> list[Idle]:
    """``count`` connections from ``local`` that never send a byte (those refused are skipped)."""
    opened = []
    for _ in range(count):
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                opened.append(await asyncio.open_connection(HOST, port, local_addr=(local, 0)))
    return opened


def close_all(opened: Sequence[Idle]) -> None:
    """Close connections."""
    for _, writer in opened:
        writer.close()


async def held_open(opened: Sequence[Idle]) -> int:
    """How many of the connections the service keeps open without a word (no answer, no close)."""

    async def silent(reader: asyncio.StreamReader) -> bool:
        try:
            async with asyncio.timeout(0.2):
                await reader.read(1024)  # an answer ("too many connections") or the close
        except TimeoutError:
            return True
        except OSError:
            return False
        return False

    return sum(await asyncio.gather(*(silent(r) for r, _ in opened)))


# --- item 1, 3, 5, 6: one service with a Modbus controller --------------------------------------


class ModbusRig:
    """A service driven over Modbus (writes allowed from 127.0.0.1 only) with station A at LP1."""

    def __init__(self, service: Service, report: Report) -> None:
        self.service, self.report = service, report
        self.station = Station(STATION_A, draws=True)
        self.controller: Modbus | None = None

    async def setup(self) -> None:
        """Station A served; the controller offers it 16 A."""
        port = self.service.evse_port
        if not await connect_station(self.station, port, addr(2)):
            raise BenchError(f"station A is not polled:\n{self.service.log_text()[-2000:]}")
        self.controller = await Modbus.open(self.service.modbus_port, addr(1))
        # Written every half second, as a controller does each cycle: the station may still be
        # registering at the first write.
        began = time.perf_counter()
        while not self.station.offering and time.perf_counter() - began < SERVED_TIMEOUT:
            await self.controller.call(self.controller.write(1, SET_CURRENT, 1600), timeout=1.0)
            await wait_until(lambda: self.station.offering, 0.5)
        waited = time.perf_counter() - began if self.station.offering else None
        self.report.add(0, "setup", "station offered current after a write", after(waited, 5))

    async def write_flood(self, client: Modbus, values: Sequence[int], size: int = 15) -> int:
        """FC 6 to LP1's set current for ATTACK_SECONDS, ``size`` at a time; answers.

        The values go round in turn; with an odd ``size`` each batch ends on another value, so
        that the value in force after each batch changes too. ``size`` 1 waits for each answer:
        the service may act on every value.
        """
        answered, i = 0, 0
        end = time.perf_counter() + ATTACK_SECONDS
        while time.perf_counter() < end:
            batch = b"".join(
                client.write(1, SET_CURRENT, values[(i + k) % len(values)]) for k in range(size)
            )
            i += size
            try:
                client.writer.write(batch)
                await client.writer.drain()
            except OSError:
                break
            got = await client.answers(size, 1.0)
            answered += len(got)
            if not got:
                break
        return answered

    async def refused_writes(self, allowed: bool) -> None:
        """1: set-current writes of 50 A, pipelined: from the controller's address (refused for
        the value) or from an address that may not write (refused for the address)."""
        who = "allowed client, bad value" if allowed else "client that may not write"
        attack = f"refused Modbus writes, FC6 10171=5000 ({who})"
        client = await Modbus.open(self.service.modbus_port, addr(1 if allowed else 5))
        window = self.service.window()
        try:
            answered = await self.write_flood(client, [5000])
        finally:
            client.close()
        m = await window.end(ATTACK_SECONDS)
        report_flood(self.report, 1, attack, m)
        self.report.add(1, attack, "writes answered/s", f"{answered / ATTACK_SECONDS:.0f}")

    async def accepted_writes(self) -> None:
        """1 and 5: the controller pipelines alternating 6 A / 32 A."""
        assert self.controller is not None
        attack = "accepted Modbus writes, 6 A / 32 A in turn, each after the last answer"
        before = self.station.pwm_changes
        window = self.service.window()
        answered = await self.write_flood(self.controller, [600, 3200], size=1)
        changes = self.station.pwm_changes - before
        m = await window.end(ATTACK_SECONDS)
        report_flood(self.report, 1, attack, m)
        self.report.add(5, attack, "writes answered/s", f"{answered / ATTACK_SECONDS:.0f}")
        self.report.add(
            5, attack, "PWM changes/s seen by the station", f"{changes / ATTACK_SECONDS:.1f}"
        )
        await self.controller.call(self.controller.write(1, SET_CURRENT, 1600))

    async def connect_close(self, one_shot: bool) -> None:
        """1: stations that connect, say who they are, and close at their first poll."""
        attack = "one-shot serials" if one_shot else "a station connecting and closing (one ID)"
        rng = random.Random(19)
        connections = 0
        end = time.perf_counter() + ATTACK_SECONDS
        window = self.service.window()

        async def loop(local: str) -> None:
            nonlocal connections
            while time.perf_counter() < end:
                serial = rng.randbytes(16).hex().upper() if one_shot else STATION_B
                station = Station(serial)
                with contextlib.suppress(OSError, TimeoutError):
                    await station.connect(self.service.evse_port, local, timeout=1.0)
                    connections += 1
                    # Closed at the first poll, or after a short wait if none comes.
                    await wait_event(station.polled, 0.5)
                station.close()
                await asyncio.sleep(0)

        await asyncio.gather(loop(addr(6)), loop(addr(16)))
        m = await window.end(ATTACK_SECONDS)
        report_flood(self.report, 1, attack, m)
        self.report.add(1, attack, "connections/s", f"{connections / ATTACK_SECONDS:.0f}")

    async def notify_flood(self) -> None:
        """5: a station that sends a notify after every report."""
        station = Station(STATION_N, notifies=True)
        if not await connect_station(station, self.service.evse_port, addr(8)):
            self.report.add(5, "notify after every report", "station polled", "no")
            return
        window = self.service.window()
        polls = station.polls
        latencies = await self.read_latencies(ATTACK_SECONDS)
        polls = station.polls - polls
        station.close()
        m = await window.end(ATTACK_SECONDS)
        attack = "notify after every report"
        self.report.add(5, attack, "polls/s seen by the station", f"{polls / ATTACK_SECONDS:.0f}")
        self.report.add(5, attack, "service CPU %", f"{m.cpu_percent:.0f}")
        self.report.add(5, attack, "log bytes/s", m.bytes_per_s)
        self.report.add(5, attack, "Modbus read p99, 100 reads/s", p99_ms(latencies))

    async def quiet_latency(self) -> None:
        """The Modbus read latency with no attack, to compare the notify flood's with."""
        latencies = await self.read_latencies(2.0)
        self.report.add(
            5, "no attack (to compare)", "Modbus read p99, 100 reads/s", p99_ms(latencies)
        )

    async def read_latencies(self, seconds: float) -> list[float]:
        """A controller reads LP1's block 100 times a second: the time of each answer."""
        client = await Modbus.open(self.service.modbus_port, addr(4))
        latencies: list[float] = []
        try:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                began = time.perf_counter()
                if await client.call(client.read(1, 0, 50), timeout=2.0) is None:
                    latencies.append(math.inf)  # unanswered
                else:
                    latencies.append(time.perf_counter() - began)
                await asyncio.sleep(0.01)
        finally:
            client.close()
        return latencies

    async def segments(self) -> None:
        """5: many requests in one TCP segment; garbage."""
        client = await Modbus.open(self.service.modbus_port, addr(1))
        try:
            client.writer.write(b"".join(client.read(1, 0, 10) for _ in range(23)))
            answered = len(await client.answers(23, 3.0))
        finally:
            client.close()
        self.report.add(5, "23 pipelined reads in one segment", "answered", f"{answered} of 23")

        client = await Modbus.open(self.service.modbus_port, addr(9))
        try:
            client.writer.write(random.Random(4096).randbytes(4096))
            began = time.perf_counter()
            answer = b""
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(3.0):
                    while chunk := await client.reader.read(65536):
                        answer += chunk
            closed = client.reader.at_eof()
            took = time.perf_counter() - began
        finally:
            client.close()
        attack = "4 KiB of garbage"
        self.report.add(5, attack, "bytes answered", len(answer))
        self.report.add(5, attack, "closed by the service", after(took if closed else None, 3))

    async def http(self) -> None:
        """6: the Host header, the page's headers, wrong admin tokens."""
        port = self.service.http_port
        evil = await http_get(port, "/api/status", host="evil.example")
        self.report.add(6, "GET /api/status with Host: evil.example", "answer", evil.status)
        page = await http_get(port, "/")
        csp = page.headers.get("content-security-policy", "")
        self.report.add(6, "GET /", "answer", page.status)
        self.report.add(6, "GET /", "CSP with frame-ancestors", yes_no("frame-ancestors" in csp))
        await self.guess_tokens()

    async def guess_tokens(self) -> None:
        """6: four keep-alive connections from one address try wrong admin tokens."""
        attack = "wrong admin tokens from one address"
        statuses: list[int] = []
        first_429: int | None = None
        end = time.perf_counter() + ATTACK_SECONDS
        url = f"http://{HOST}:{self.service.http_port}/api/stations/{STATION_A}/forget"
        connector = aiohttp.TCPConnector(limit=4, local_addr=(addr(7), 0))
        timeout = aiohttp.ClientTimeout(total=3.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker(n: int) -> None:
                nonlocal first_429
                i = 0
                while time.perf_counter() < end:
                    i += 1
                    headers = {"Authorization": f"Bearer wrong-token-{n}-{i:08d}"}
                    try:
                        async with session.post(url, headers=headers) as answer:
                            await answer.read()
                            statuses.append(answer.status)
                    except (aiohttp.ClientError, TimeoutError):
                        statuses.append(0)
                        await asyncio.sleep(0.01)
                    if statuses[-1] == 429 and first_429 is None:
                        first_429 = len(statuses)

            await asyncio.gather(*(worker(n) for n in range(4)))
        refused = sum(1 for s in statuses if s in (401, 403))
        throttled = sum(1 for s in statuses if s == 429)
        self.report.add(6, attack, "guesses checked (401/403) in 3 s", refused)
        self.report.add(6, attack, "429 answers/s", f"{throttled / ATTACK_SECONDS:.0f}")
        self.report.add(
            6,
            attack,
            "first 429 at guess",
            "none" if first_429 is None else f"#{first_429}",
        )

    async def idle_modbus(self) -> None:
        """3: 20 addresses x 8 idle Modbus connections; then the controller and a newcomer."""
        attack = "20 addresses x 8 idle Modbus connections"
        held: list[Idle] = []
        # The controller (127.0.0.1) has written; it comes back with a new connection after
        # the flood, as a controller does that connects for each cycle or after a restart.
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        try:
            for n in range(20):
                held += await open_idle(self.service.modbus_port, addr(20 + n), 8)
            await asyncio.sleep(0.5)
            open_now = await held_open(held)
            port = self.service.modbus_port
            controller = await modbus_answers(port, addr(1), lambda c: c.read(1, 0, 10))
            newcomer = await modbus_answers(port, addr(45), lambda c: c.read(1, 0, 10))
        finally:
            close_all(held)
        self.report.add(3, attack, "attacker connections held open", f"{open_now} of 160")
        self.report.add(3, attack, "controller that wrote before answered", yes_no(controller))
        self.report.add(3, attack, "new Modbus client answered", yes_no(newcomer))
        await asyncio.sleep(0.3)

    async def idle_http(self) -> None:
        """3: 4 addresses x 32 idle HTTP connections; then the page and /metrics."""
        attack = "4 addresses x 32 idle HTTP connections"
        held: list[Idle] = []
        try:
            for n in range(4):
                held += await open_idle(self.service.http_port, addr(50 + n), 32)
            await asyncio.sleep(0.5)
            open_now = await held_open(held)
            status = await http_get(self.service.http_port, "/api/status", local=addr(1))
            metrics = await http_get(self.service.http_port, "/metrics", local=addr(1))
        finally:
            close_all(held)
        self.report.add(3, attack, "attacker connections held open", f"{open_now} of 128")
        self.report.add(3, attack, "/api/status answered 200", yes_no(status.status == 200))
        self.report.add(3, attack, "/metrics answered 200", yes_no(metrics.status == 200))
        await asyncio.sleep(0.3)

    async def half_open(self) -> None:
        """3: 19 addresses x 8 station connections without a handshake; then a new station."""
        attack = "19 addresses x 8 half-open station connections"
        half: list[Station] = []
        # The known station A is away (restarting, say) while the flood comes.
        self.station.close()
        await asyncio.sleep(0.3)
        try:
            for n in range(19):
                for _ in range(8):
                    station = Station(f"{n:032X}", handshake=False)
                    with contextlib.suppress(OSError, TimeoutError):
                        await station.connect(self.service.evse_port, addr(60 + n), timeout=1.0)
                        half.append(station)
            await asyncio.sleep(0.5)
            open_now = sum(1 for s in half if not s.closed.is_set())
            newcomer = Station(STATION_C, draws=True)
            served_new = await connect_station(newcomer, self.service.evse_port, addr(85))
            newcomer.close()
            self.station = Station(STATION_A, draws=True)
            served_known = await connect_station(self.station, self.service.evse_port, addr(2))
        finally:
            for station in half:
                station.close()
        self.report.add(3, attack, "attacker connections held open", f"{open_now} of 152")
        self.report.add(3, attack, "new station polled", yes_no(served_new))
        self.report.add(3, attack, "known station polled again", yes_no(served_known))

    async def close(self) -> None:
        """Close the controller and the station before the service stops."""
        if self.controller is not None:
            self.controller.close()
        self.station.close()
        await asyncio.sleep(0.1)


async def run_modbus_items(source: Path, workdir: Path, report: Report, items: set[int]) -> None:
    """Items 1 (Modbus and station floods), 3, 5 (notify, writes, segments), 6."""
    service = Service(source, workdir, "modbus", modbus_write_allow=[f"{addr(1)}/32"])
    rig = ModbusRig(service, report)
    try:
        await service.start()
        await rig.setup()
        if 6 in items:
            await rig.http()
        if 1 in items:
            await rig.refused_writes(allowed=False)
            await rig.refused_writes(allowed=True)
        if items & {1, 5}:
            await rig.accepted_writes()
        if 1 in items:
            await rig.connect_close(one_shot=False)
            await rig.connect_close(one_shot=True)
        if 5 in items:
            await rig.quiet_latency()
            await rig.notify_flood()
            await rig.segments()
        if 3 in items:
            await rig.idle_modbus()
            await rig.idle_http()
            await rig.half_open()
        tracebacks = service.log_text().count("Traceback (most recent call last)")
        report.add(0, "Modbus-driven service, whole run", "tracebacks in the log", tracebacks)
    finally:
        await rig.close()
        await service.stop()


# --- item 2: an impostor with a known station's ID ------------------------------------------------


MIN_RUN = 4  # hex digits: shorter runs turn up by chance in a page of text


def revealed(serial: str, text: str) -> set[int]:
    """The positions of the serial's hex digits that ``text`` shows (either case): those in a run
    of at least MIN_RUN consecutive digits of the serial found in the text."""
    low, text = serial.lower(), text.lower()
    shown: set[int] = set()
    for start in range(len(low) - MIN_RUN + 1):
        end = start + MIN_RUN
        if low[start:end] not in text:
            continue
        while end < len(low) and low[start : end + 1] in text:
            end += 1
        shown.update(range(start, end))
    return shown


async def public_bits(service: Service, report: Report) -> None:
    """2: how many of the real station's ID bits are shown to anyone, per place."""
    attack = "the ID, read without login"
    status = await http_get(service.http_port, "/api/status")
    metrics = await http_get(service.http_port, "/metrics")
    client = await Modbus.open(service.modbus_port, addr(1))
    try:
        words = await client.registers(1, SERIAL_NUMBER, 10) or []
    finally:
        client.close()
    modbus_text = b"".join(struct.pack(">H", w) for w in words).decode("latin-1")
    places = {
        "/api/status": status.body.decode("utf-8", "replace"),
        "/metrics": metrics.body.decode("utf-8", "replace"),
        "Modbus serial number (10150..)": modbus_text,
    }
    union: set[int] = set()
    for place, text in places.items():
        shown = revealed(REAL_ID, text)
        union |= shown
        report.add(2, attack, f"ID bits shown by {place}", f"{4 * len(shown)} of 128")
    report.add(2, attack, "ID bits shown by them together", f"{4 * len(union)} of 128")


async def run_identity(source: Path, workdir: Path, report: Report) -> None:
    """Item 2: the real station goes offline, an impostor takes its ID, the real one returns."""
    service = Service(source, workdir, "identity")
    port = service.evse_port
    real = Station(REAL_ID)
    impostor = Station(REAL_ID, lies=True)
    stations = [real, impostor]
    stop = asyncio.Event()
    controllers: list[Modbus] = []

    async def drive() -> None:
        # A controller that offers 16 A at LP1 every half second, as evcc would every cycle.
        controller = await Modbus.open(service.modbus_port, addr(1))
        controllers.append(controller)
        while not stop.is_set():
            await controller.call(controller.write(1, SET_CURRENT, 1600), timeout=1.0)
            await wait_event(stop, 0.5)

    driver: asyncio.Task[None] | None = None
    attack = "impostor with the ID of an offline station"
    try:
        await service.start()
        driver = asyncio.create_task(drive())
        if not await connect_station(real, port, addr(2)):
            raise BenchError(f"the real station is not polled:\n{service.log_text()[-2000:]}")
        waited = await wait_until(lambda: real.offering, SERVED_TIMEOUT)
        report.add(2, attack, "real station offered current at first", after(waited, 5))
        await asyncio.sleep(1.5)  # past lp_remember_after: a station the service knows
        await public_bits(service, report)
        energy_before = await energy_wh(service.modbus_port)
        real.close()
        await asyncio.sleep(1.0)  # offline

        impostor_connected = await connect_station(impostor, port, addr(3))
        report.add(2, attack, "impostor (other address) polled", yes_no(impostor_connected))
        await asyncio.sleep(3.0)  # the impostor alone

        began = time.perf_counter()
        served_after: float | None = None
        limit = 10.0
        while time.perf_counter() - began < limit:
            back = Station(REAL_ID)
            stations.append(back)
            if await connect_station(back, port, addr(2)):
                polled_after = time.perf_counter() - began
                # Served: it stays connected (is not closed at once as a duplicate).
                await asyncio.sleep(1.0)
                if not back.closed.is_set():
                    served_after = polled_after
                    break
            back.close()
            await asyncio.sleep(0.5)
        report.add(
            2, attack, "real station (its own address) served again", after(served_after, 10)
        )
        back = stations[-1]
        if served_after is not None:
            waited = await wait_until(lambda: back.offering, SERVED_TIMEOUT)
            report.add(2, attack, "real station offered current again", after(waited, 5))
        energy_after = await energy_wh(service.modbus_port)
        report.add(2, attack, "current-offering PWM commands to the impostor", impostor.offers)
        report.add(
            2, attack, "impostor still connected at the end", yes_no(not impostor.closed.is_set())
        )
        if energy_before is None or energy_after is None:
            report.add(2, attack, "LP1 energy changed by the impostor", "not readable")
        else:
            report.add(
                2,
                attack,
                "LP1 energy changed by the impostor",
                f"{energy_after - energy_before} Wh",
            )
    finally:
        stop.set()
        if driver is not None:
            with contextlib.suppress(OSError, TimeoutError):
                await driver
        for controller in controllers:
            controller.close()
        for station in stations:
            station.close()
        await asyncio.sleep(0.1)
        await service.stop()


# --- item 4: LP squatting across a restart --------------------------------------------------------

SQUATTERS = 250  # more than every LP of any version (9 on the old one, 243 on a newer one)


async def run_squatting(source: Path, workdir: Path, report: Report) -> None:
    """Item 4: fake stations answer polls, go, the service restarts, a real new station comes."""
    # Caps that hold every squatter: this item is about LPs, not connection slots.
    service = Service(
        source,
        workdir,
        "squat",
        evse_max_connections=1024,
        evse_max_per_address=1024,
    )
    attack = f"{SQUATTERS} fake stations answer polls for 3 s, then a restart"
    squatters = [Station(f"F{n:031X}") for n in range(SQUATTERS)]
    newcomer = Station(STATION_NEW, draws=True)
    try:
        await service.start()
        for i in range(0, SQUATTERS, 50):
            await asyncio.gather(
                *(s.connect(service.evse_port, addr(2)) for s in squatters[i : i + 50]),
                return_exceptions=True,
            )
        polled = await asyncio.gather(*(wait_event(s.polled, 10.0) for s in squatters))
        report.add(4, attack, "fake stations polled", f"{sum(polled)} of {SQUATTERS}")
        await asyncio.sleep(3.0)  # well past lp_remember_after (1 s)
        for s in squatters:
            s.close()
        await asyncio.sleep(0.5)
        await service.stop()
        await service.start()

        served = await connect_station(newcomer, service.evse_port, addr(3))
        report.add(4, attack, "new station polled after the restart", yes_no(served))
        # A controller offers 16 A on every LP there may be: the newcomer gets it wherever it is.
        client = await Modbus.open(service.modbus_port, addr(1))
        began = time.perf_counter()
        try:
            while time.perf_counter() - began < 6.0 and not newcomer.offering:
                for lp in range(1, SQUATTERS + 3):
                    client.writer.write(client.write(lp, SET_CURRENT, 1600))
                await client.writer.drain()
                await client.answers(SQUATTERS + 2, 1.0)
                await asyncio.sleep(0.2)
        finally:
            client.close()
        offered = newcomer.offering
        took = time.perf_counter() - began
        report.add(
            4,
            attack,
            "new station offered current by a controller",
            after(took if offered else None, 6),
        )
    finally:
        for s in [*squatters, newcomer]:
            s.close()
        await asyncio.sleep(0.1)
        await service.stop()


# --- item 1 (MQTT) and 5 (heartbeat): the openWB primary's broker ---------------------------------

SET_CURRENT_TOPIC = "openWB/set/internal_chargepoint/0/data/set_current"
HEARTBEAT_TOPIC = "openWB/set/internal_chargepoint/global_data"
MQTT_HEARTBEAT_TIMEOUT = 3.0


async def run_mqtt_items(source: Path, workdir: Path, report: Report, items: set[int]) -> None:
    """Items 1 (bad set_current payloads) and 5 (a far-future heartbeat), controller openwb-mqtt."""
    broker, broker_port = await start_mosquitto(workdir)
    service = Service(
        source,
        workdir,
        "mqtt",
        mqtt_host=HOST,
        mqtt_port=broker_port,
        controller="openwb-mqtt",
        mqtt_heartbeat_timeout=MQTT_HEARTBEAT_TIMEOUT,
    )
    station = Station(STATION_A, draws=True)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        await service.start()
        async with aiomqtt.Client(HOST, broker_port, identifier="primary") as primary:

            async def heartbeats() -> None:
                # The primary: its clock every second, its set current every other.
                n = 0
                while not stop.is_set():
                    beat = json.dumps({"heartbeat": int(time.time())})
                    await primary.publish(HEARTBEAT_TOPIC, beat)
                    if n % 2 == 0:
                        await primary.publish(SET_CURRENT_TOPIC, "16")
                    n += 1
                    await wait_event(stop, 1.0)

            tasks.append(asyncio.create_task(heartbeats()))
            if not await connect_station(station, service.evse_port, addr(2)):
                raise BenchError(f"the station is not polled:\n{service.log_text()[-2000:]}")
            waited = await wait_until(lambda: station.offering, 10.0)
            report.add(
                0, "setup (openWB primary over MQTT)", "station offered current", after(waited, 10)
            )
            if 1 in items:
                await bad_payloads(service, broker_port, report)
            if items & {1, 5}:
                await mqtt_write_flood(service, broker_port, station, report)
            if 5 in items:
                await far_future_heartbeat(primary, station, report)
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        station.close()
        await asyncio.sleep(0.1)
        await service.stop()
        await asyncio.to_thread(broker.stop, 5.0)


async def bad_payloads(service: Service, broker_port: int, report: Report) -> None:
    """1: set_current payloads that break a JSON decoder, 200 a second from any client."""
    async with aiomqtt.Client(HOST, broker_port, identifier="attacker") as attacker:
        for name, payload in (("'1' * 4400", "1" * 4400), ("'[' * 3000", "[" * 3000)):
            attack = f"MQTT set_current {name}"
            window = service.window()
            sent = 0
            end = time.perf_counter() + ATTACK_SECONDS
            while time.perf_counter() < end:
                await attacker.publish(SET_CURRENT_TOPIC, payload)
                sent += 1
                await asyncio.sleep(0.005)
            m = await window.end(ATTACK_SECONDS)
            report_flood(report, 1, attack, m)
            report.add(1, attack, "messages sent", sent)


async def mqtt_write_flood(
    service: Service, broker_port: int, station: Station, report: Report
) -> None:
    """1 and 5: set_current 6 and 32 in turn, as fast as a client publishes (QoS 0)."""
    attack = "MQTT set_current 6 / 32 in turn"
    async with aiomqtt.Client(HOST, broker_port, identifier="flooder") as flooder:
        before, stops = station.pwm_changes, station.stops
        window = service.window()
        sent = 0
        end = time.perf_counter() + ATTACK_SECONDS
        while time.perf_counter() < end:
            await flooder.publish(SET_CURRENT_TOPIC, "6" if sent % 2 else "32")
            sent += 1
            if sent % 10 == 0:
                await asyncio.sleep(0.001)  # let the client's sender run
        changes = station.pwm_changes - before
        m = await window.end(ATTACK_SECONDS)
        report_flood(report, 1, attack, m)
        report.add(5, attack, "messages sent/s", f"{sent / ATTACK_SECONDS:.0f}")
        report.add(
            5, attack, "PWM changes/s seen by the station", f"{changes / ATTACK_SECONDS:.1f}"
        )
        # The primary's heartbeats share the broker and the service's queue with the flood.
        report.add(5, attack, "charging stopped during the flood", yes_no(station.stops > stops))
        await flooder.publish(SET_CURRENT_TOPIC, "16")
    waited = await wait_until(lambda: station.offering, 10.0)
    report.add(5, attack, "current offered after the flood", after(waited, 10))


async def far_future_heartbeat(primary: aiomqtt.Client, station: Station, report: Report) -> None:
    """5: one heartbeat from the year 2100 between the primary's live ones."""
    attack = 'one heartbeat {"heartbeat": 4102444800}'
    if not station.offering:
        report.add(5, attack, "station offered current before", "no: cannot measure")
        return
    began = time.perf_counter()
    await primary.publish(HEARTBEAT_TOPIC, json.dumps({"heartbeat": 4102444800}))
    limit = 4 * MQTT_HEARTBEAT_TIMEOUT
    stopped = await wait_until(lambda: not station.offering, limit)
    report.add(5, attack, "charging stopped at the station", after(stopped, limit))
    if stopped is not None:
        left = max(0.0, limit - (time.perf_counter() - began))
        resumed = await wait_until(lambda: station.offering, left)
        took = None if resumed is None else time.perf_counter() - began
        report.add(5, attack, "current offered again (from the heartbeat)", after(took, limit))


# --- the command ----------------------------------------------------------------------------------


def item_list(text: str) -> set[int]:
    """``"1,5"`` -> {1, 5}, checked."""
    try:
        items = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"items are numbers 1..6, got {text!r}") from None
    if not items or not items <= set(ITEMS):
        raise argparse.ArgumentTypeError(f"items are 1..6, got {text!r}")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile",
        description="The attacks of issue 19 against a checkout of the service (about 2 min).",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the checkout whose service is attacked (default: this one)",
    )
    parser.add_argument(
        "--only", type=item_list, default=set(ITEMS), help="items of issue 19 to run, e.g. 1,5"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the configs and the service logs in DIR (default: a temporary directory)",
    )
    return parser.parse_args(argv)


def describe(source: Path) -> str:
    """The checkout under test: its path and commit."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return f"{source} ({commit})"


PART_TIMEOUT = 180.0  # seconds for one part, service start and stop included


async def run(args: argparse.Namespace, workdir: Path, report: Report) -> bool:
    """Every selected item, each part against a fresh service; False if a part failed.

    A part that fails is named in the table and the others still run.
    """
    source: Path = args.source.resolve()
    parts: list[tuple[str, set[int], Callable[[], Awaitable[None]]]] = [
        (
            "Modbus-driven",
            {1, 3, 5, 6},
            lambda: run_modbus_items(source, workdir, report, args.only),
        ),
        ("identity", {2}, lambda: run_identity(source, workdir, report)),
        ("LP squatting", {4}, lambda: run_squatting(source, workdir, report)),
        ("openWB MQTT", {1, 5}, lambda: run_mqtt_items(source, workdir, report, args.only)),
    ]
    ok = True
    for name, wanted, part in parts:
        if not wanted & args.only:
            continue
        try:
            async with asyncio.timeout(PART_TIMEOUT):
                await part()
        except (BenchError, TimeoutError, OSError, EOFError, aiomqtt.MqttError) as err:
            ok = False
            why = str(err).strip().splitlines()[0] if str(err).strip() else ""
            report.add(0, f"part {name}", "FAILED", f"{type(err).__name__}: {why}"[:120])
            say(f"part {name} failed: {type(err).__name__}: {err}")
    return ok


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the attacks and print the table; exit code 0 if every part ran."""
    args = parse_args(argv)
    if not (args.source / "openwb_modbus_evse").is_dir():
        print(f"{args.source} holds no openwb_modbus_evse package", file=sys.stderr)
        return 2
    if shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        say("note: no mosquitto: the MQTT items will fail (apt-get install mosquitto)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    report = Report(args.only)
    # SIGTERM ends the run as Ctrl-C does. Not by cancelling the main task: on Python 3.11 a
    # cancellation that meets an expiring asyncio.timeout() can be swallowed, and the run would
    # go on.
    signal.signal(signal.SIGTERM, _interrupt)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="openwb-hostile-") as tmp:
        workdir = Path(tmp)
        if args.keep is not None:
            workdir = args.keep.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            code = 0 if asyncio.run(run(args, workdir, report)) else 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            say("interrupted")
            code = 130
        finally:
            Child.stop_all()
    items = ",".join(map(str, sorted(args.only)))
    report.print(
        f"\nissue 19 attacks against {describe(args.source.resolve())}, items {items}, "
        f"{time.perf_counter() - began:.0f} s"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
