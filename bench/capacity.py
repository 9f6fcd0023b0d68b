"""Part 3: how many stations one service keeps polled on time, with its CPU and memory use."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

from bench.processes import CpuMeter, start_bridge
from bench.report import percentile, say, section, table
from bench.station import CONNECT_BATCH, MiniStation, chunks, close_stations
from openwb_modbus_evse.tools.simulator import virtual_serial

POLL_INTERVAL = 5.0  # the bridge's default
POLL_TOLERANCE = 1.0  # a poll counts as on time within POLL_INTERVAL +- this


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
