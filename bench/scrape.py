"""Part 5: a controller's Modbus latency while /metrics is hammered, with 200 stations."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from bench.controller import READ_EVERY, controller_reads, modbus_client, wait_for_lp, write_current
from bench.processes import HOST, CpuMeter, start_bridge
from bench.report import ms, percentile, say, section, table
from bench.station import CONNECT_BATCH, MiniStation, chunks, close_stations
from openwb_modbus_evse.tools.simulator import virtual_serial
from tests.ports import free_port

SCRAPE_STATIONS = 200
SCRAPERS = 20
SCRAPE_BURST = 300


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
