"""Part 4: from the heartbeat deadline to the PWM-100 command on the station."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from bench.controller import modbus_client, read_block, wait_for_lp, write_current
from bench.processes import start_bridge
from bench.report import BenchError, ms, say, section, table
from bench.station import MiniStation, close_stations, is_pwm, registered
from openwb_modbus_evse.chargepoint import CA_PER_PWM_PERCENT
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.tools.simulator import virtual_serial


async def bench_heartbeat(args: argparse.Namespace, workdir: Path) -> None:
    """Part 4: from the heartbeat deadline to the PWM-100 command on the station."""
    timeout = args.heartbeat_timeout
    say(f"heartbeat: {args.heartbeat_rounds} lapses with --heartbeat-timeout {timeout:g}")
    # Every lapse opens the contactor; without the rest it would stay open for a minute after.
    bridge = await start_bridge(
        workdir, "heartbeat", "--heartbeat-timeout", f"{timeout:g}", "--contactor-min-off", "0"
    )
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
