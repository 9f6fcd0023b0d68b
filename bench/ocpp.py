"""Part 9: OCPP 1.6J: SetChargingProfile -> set-PWM latency, and many stations each with its own
OCPP connection to one central system (the service's CPU and memory in steady state)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from ocpp import messages as ocpp_messages
from ocpp.v16 import call

from bench.processes import CpuMeter, start_bridge
from bench.report import BenchError, ms, percentile, say, section, table
from bench.station import CONNECT_BATCH, MiniStation, chunks, close_stations, is_pwm
from openwb_modbus_evse.chargepoint import CA_PER_PWM_PERCENT
from openwb_modbus_evse.tools.simulator import virtual_serial
from tests.ocpp_central import Csms

STEADY_S = 20.0  # seconds of steady state measured


def _config(path: Path, url: str, n: int) -> Path:
    lines = [f'ocpp_url = "{url}"', 'controller = "ocpp"']
    for i in range(1, n + 1):
        lines += ["[[station]]", f'serial = "{virtual_serial(i)}"', f'name = "cp{i}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _profile(amps: int, profile_id: int) -> dict[str, object]:
    return {
        "chargingProfileId": profile_id,
        "stackLevel": 0,
        "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": amps}],
        },
    }


async def bench_ocpp(args: argparse.Namespace, workdir: Path) -> None:
    """SetChargingProfile -> PWM latency on one station; then N stations in steady state."""
    n = max(args.ocpp_stations, 1)
    # The central system here is the measuring tool: its own validation on the loop, as the
    # service does, not in a worker thread whose wake-up would count as the service's latency.
    ocpp_messages.ASYNC_VALIDATION = False
    say(f"ocpp: {args.writes} SetChargingProfile, then {n} stations for {STEADY_S:g} s")
    csms = Csms()
    await csms.start()
    config = _config(workdir / "ocpp.toml", csms.url(), n)
    bridge = await start_bridge(
        workdir,
        "ocpp",
        "--config",
        str(config),
        "--evse-max-connections",
        str(n + 16),
        "--evse-max-per-address",
        str(n + 16),
    )
    stations = [MiniStation(virtual_serial(i), record=i == 1) for i in range(1, n + 1)]
    to_pwm: list[float] = []
    try:
        t0 = time.perf_counter()
        for batch in chunks(stations, CONNECT_BATCH):
            await asyncio.gather(*(s.connect(bridge.evse_port) for s in batch))
        deadline = t0 + 60 + n / 5
        while len({r.ident for r in csms.received if r.action == "StartTransaction"}) < n:
            bridge.child.check_alive()
            if time.perf_counter() > deadline:
                raise BenchError("not every station booted and started its transaction in time")
            await asyncio.sleep(0.1)
        connect_s = time.perf_counter() - t0
        first = stations[0]
        cs = csms.connected["cp1"]
        steps = [(16, 16 * 100 // CA_PER_PWM_PERCENT), (10, 10 * 100 // CA_PER_PWM_PERCENT)]
        await asyncio.sleep(1.0)
        for i in range(args.writes):
            amps, pwm = steps[i % 2]
            first.drain()
            start = time.perf_counter()
            result = await cs.call(
                call.SetChargingProfile(connector_id=1, cs_charging_profiles=_profile(amps, 1))
            )
            if result.status != "Accepted":
                raise BenchError(f"SetChargingProfile answered {result.status}")
            at, _ = await first.expect(is_pwm(pwm), timeout=5.0)
            to_pwm.append(at - start)
            await first.paced(at)
        await asyncio.sleep(2.0)  # the last command settles
        meter = CpuMeter(bridge.child)
        await asyncio.sleep(STEADY_S)
        bridge_cpu, bench_cpu = meter.percent()
        rss, peak = bridge.child.memory_kib()
        up = len(csms.connected)
        # The central system restarts: how the stations come back.
        await csms.stop()
        await asyncio.sleep(1.0)
        csms.connect_times.clear()
        restarted = time.monotonic()
        await csms.start()
        deadline = time.perf_counter() + 120
        while len(csms.connected) < n:
            if time.perf_counter() > deadline:
                raise BenchError("not every station came back after the central system restart")
            await asyncio.sleep(0.1)
        back = sorted(t - restarted for t in csms.connect_times)
        peak_100ms = max(sum(1 for t in back if a <= t < a + 0.1) for a in back)
    finally:
        await close_stations(stations)
        bridge.child.stop()
        await csms.stop()
    section(
        f"9. OCPP 1.6J: SetChargingProfile -> set-PWM ({args.writes} profiles alternating "
        f"16/10 A), and {n} stations each with its own OCPP connection",
        table(
            ["measure", "value"],
            [
                ["SetChargingProfile -> set-PWM p50", ms(percentile(to_pwm, 50))],
                ["p99", ms(percentile(to_pwm, 99))],
                ["max", ms(max(to_pwm))],
                ["stations booted + transaction started", f"{n} in {connect_s:.1f} s"],
                ["OCPP connections open at the end", up],
                [f"service CPU % of one core ({STEADY_S:g} s steady)", f"{bridge_cpu:.1f}"],
                ["service RSS / peak MiB", f"{rss / 1024:.0f} / {peak / 1024:.0f}"],
                ["bench CPU % (central system + stations)", f"{bench_cpu:.1f}"],
                ["after a central-system restart: all back in", f"{back[-1]:.1f} s"],
                ["reconnects in the busiest 100 ms", peak_100ms],
            ],
        ),
        [
            f"bridge: {bridge.options}",
            "central system: tests/ocpp_central.py (the ocpp library's server side, schema "
            "validation on, on its loop) in the bench process; stations: minimal, plugged in, "
            "controller ocpp",
            "latency: from sending the call to the set-PWM frame at the station (includes the "
            "central system's own send and the schema validation on both ends)",
            "steady state: heartbeats every 300 s and MeterValues every 60 s (the defaults)",
            "restart: the central system stops, is away 1 s, comes back on the same port; "
            "times from its start to each station's websocket",
            "goals: p99 <= 5 ms; steady state under 10 % of one core and 150 MB",
        ],
    )
