"""Part 1: Modbus read throughput of the service, beside a plain pymodbus and a libmodbus server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from bench.controller import (
    BLOCK_SIZE,
    BLOCK_START,
    DEVICE_ID,
    modbus_client,
    read_block,
    wait_for_lp,
    write_current,
)
from bench.processes import HOST, Child, CpuMeter, start_bridge, wait_listening
from bench.report import BenchError, ms, percentile, say, section, table
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP, Value
from openwb_modbus_evse.tools.simulator import VehicleConfig, VirtualStation, virtual_serial
from tests.ports import free_port

# C programs on libmodbus that `make bench` builds into the venv (bench/bench_client.c,
# bench/bench_server.c).
C_CLIENT = Path(sys.executable).parent / "bench_client"
C_SERVER = Path(sys.executable).parent / "bench_server"
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
