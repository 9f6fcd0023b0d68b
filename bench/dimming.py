"""Part 2d: from a grid operator's dimming limit over MQTT to set-PWM on the station socket."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.controller import modbus_client, wait_for_lp, write_current
from bench.processes import HOST, start_bridge, start_mosquitto
from bench.report import BenchError, latency_row, say, section, table
from bench.station import MiniStation, close_stations, is_collect, is_pwm, registered
from openwb_modbus_evse.chargepoint import CA_PER_PWM_PERCENT
from openwb_modbus_evse.tools.simulator import virtual_serial

TOPIC = "openwb-modbus-evse/set/supply_limit"


async def bench_dim(args: argparse.Namespace, workdir: Path) -> None:
    """Part 2d: supply_limit publishes alternating 10/8 A while the controller asks for 16 A."""
    import aiomqtt

    say(f"dim: {args.writes} dimming limits over MQTT")
    broker, mqtt_port = await start_mosquitto(workdir)
    bridge = await start_bridge(
        workdir, "dim", *("--mqtt-host", HOST, "--mqtt-port", str(mqtt_port))
    )
    station = MiniStation(virtual_serial(1), record=True)
    client = None
    to_pwm: list[float] = []
    steps = [(10, 1000 // CA_PER_PWM_PERCENT), (8, 800 // CA_PER_PWM_PERCENT)]
    try:
        await station.connect(bridge.evse_port)
        await registered(station)
        client = await modbus_client(bridge.modbus_port)
        await wait_for_lp(client)
        station.drain()
        await write_current(client, 1600)
        await station.expect(is_pwm(1600 // CA_PER_PWM_PERCENT), timeout=5.0)
        async with aiomqtt.Client(HOST, mqtt_port) as mqtt:
            await asyncio.sleep(0.5)  # the service has subscribed by now
            for i in range(args.writes):
                amps, pwm = steps[i % 2]
                station.drain()
                t0 = time.perf_counter()
                await mqtt.publish(TOPIC, str(amps))
                at, request = await station.expect(is_pwm(), timeout=5.0)
                if request.pwm != pwm:
                    raise BenchError(f"dimmed to {amps} A, expected PWM {pwm}, got {request.pwm}")
                to_pwm.append(at - t0)
                await station.expect(is_collect, timeout=5.0)
                await station.paced(at)
            await mqtt.publish(TOPIC, "")
    finally:
        if client is not None:
            client.close()
        await close_stations([station])
        bridge.child.stop()
        broker.stop()

    rows = [latency_row("MQTT supply_limit -> set-PWM on station", to_pwm)]
    section(
        f"2d. Dimming limit (§14a) over MQTT -> set-PWM command on the station socket, "
        f"{args.writes} limits alternating 10/8 A (PWM {steps[0][1]}/{steps[1][1]}) while the "
        "controller asks for 16 A; compare with part 2b",
        table(["interval", "p50 ms", "p99 ms", "max ms"], rows),
        [
            f"bridge: {bridge.options}",
            "  through a mosquitto on loopback; the state file is written on every change",
        ],
    )
