"""Part 6: a controller's Modbus latency while 1000 connections that never send are open."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from bench.controller import READ_EVERY, controller_reads, modbus_client, wait_for_lp, write_current
from bench.processes import HOST, CpuMeter, start_bridge
from bench.report import ms, percentile, say, section, table
from bench.station import CONNECT_BATCH, MiniStation, close_stations
from openwb_modbus_evse.tools.simulator import virtual_serial

IDLE_CONNECTIONS = 1000
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, count: int) -> list[Connection]:
    """Open ``count`` connections that never send anything (one closed to make room, or
    refused, sees EOF)."""
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
            "idle held open: connections the bridge kept; at modbus_max_connections / "
            "modbus_max_per_address (all from one address here) each newer one took the place "
            "of the oldest silent one (the controller, which wrote, keeps its place)",
        ],
    )
