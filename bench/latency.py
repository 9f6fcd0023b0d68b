"""Parts 2, 2b and 2c: from a controller's command to the set-PWM on the station socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from bench.controller import SET_CURRENT, modbus_client, wait_for_lp, write_current
from bench.processes import HOST, public_id, start_bridge, start_mosquitto
from bench.report import BenchError, latency_row, say, section, table
from bench.station import MiniStation, close_stations, is_collect, is_pwm, registered
from openwb_modbus_evse.chargepoint import CA_PER_PWM_PERCENT
from openwb_modbus_evse.tools.simulator import virtual_serial

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
            await station.paced(at)
    finally:
        if client is not None:
            client.close()
        await close_stations([station])
        bridge.child.stop()

    rows = [
        latency_row("write -> set-PWM on station", to_pwm),
        latency_row("write -> Modbus response", write_rtt),
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
                await station.paced(at)
    finally:
        await close_stations([station])
        bridge.child.stop()
        broker.stop()

    rows = [latency_row("MQTT publish -> set-PWM on station", to_pwm)]
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


# --- part 2d: Home Assistant command-to-PWM latency -------------------------------------------


async def bench_homeassistant(args: argparse.Namespace, workdir: Path) -> None:
    """Part 2d: from a Home Assistant max-current number command to set-PWM on the station."""
    import aiomqtt

    from openwb_modbus_evse.interfaces import homeassistant_messages as ha

    say(f"homeassistant: {args.writes} max-current commands of Home Assistant over MQTT")
    broker, mqtt_port = await start_mosquitto(workdir)
    bridge = await start_bridge(
        workdir,
        "homeassistant",
        *("--mqtt-host", HOST, "--mqtt-port", str(mqtt_port), "--controller", "homeassistant"),
    )
    serial = virtual_serial(1)
    ident = public_id(workdir, "homeassistant", serial)  # its name on the broker (not its ID)
    station = MiniStation(serial, record=True)
    to_pwm: list[float] = []
    try:
        await station.connect(bridge.evse_port)
        await registered(station)
        async with aiomqtt.Client(HOST, mqtt_port) as client:
            await client.subscribe(f"{ha.TOPIC_ROOT}/service/+/station/{ident}/availability")
            async with asyncio.timeout(15):  # ready: connected and the station seen
                async for message in client.messages:
                    if message.payload == ha.ONLINE.encode():
                        break
            await client.publish(ha.status_topic("homeassistant"), ha.ONLINE)
            await client.publish(ha.command_topic(ident, "enable"), ha.ON)
            await station.expect(is_pwm(), timeout=5.0)  # the default max current: 32 A
            await station.expect(is_collect, timeout=5.0)
            steps = [(16, 16 * 100 // CA_PER_PWM_PERCENT), (10, 10 * 100 // CA_PER_PWM_PERCENT)]
            for i in range(args.writes):
                amps, pwm = steps[i % 2]
                station.drain()
                t0 = time.perf_counter()
                await client.publish(ha.command_topic(ident, "max_current"), f"{amps}.0")
                at, request = await station.expect(is_pwm(), timeout=5.0)
                if request.pwm != pwm:
                    raise BenchError(f"sent {amps} A, expected PWM {pwm}, got {request.pwm}")
                to_pwm.append(at - t0)
                await station.expect(is_collect, timeout=5.0)
                await station.paced(at)  # also below the interface's command rate limit (50/s)
    finally:
        await close_stations([station])
        bridge.child.stop()
        broker.stop()

    rows = [latency_row("number command -> set-PWM on station", to_pwm)]
    section(
        f"2d. Home Assistant max-current number over MQTT -> set-PWM command on the station "
        f"socket, {args.writes} commands alternating 16/10 A (PWM {steps[0][1]}/{steps[1][1]}); "
        "goal: p99 <= 5 ms",
        table(["interval", "p50 ms", "p99 ms", "max ms"], rows),
        [
            f"bridge: {bridge.options}",
            "  through a mosquitto on loopback, as Home Assistant sends them (not retained), "
            "one every 25 ms at most",
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
                await station.paced(at)
                poll_to_message.append(await next_of("response_collect_data") - polled)
    finally:
        await close_stations([station])
        bridge.child.stop()
        broker.stop()

    section(
        f"2c. Rust-bridge request_set_pwm_percent over MQTT, {args.writes} requests alternating "
        "26/16 %; compare with parts 2 and 2b",
        table(
            ["interval", "p50 ms", "p99 ms", "max ms"],
            [
                latency_row("publish -> set-PWM on station", to_pwm),
                latency_row("publish -> response_set_pwm_percent", to_response),
                latency_row("collect-data on station -> response_collect_data", poll_to_message),
            ],
        ),
        [
            f"bridge: {bridge.options}",
            "  through a mosquitto on loopback; one client publishes and subscribes",
            "  the service's client and mosquitto (set_tcp_nodelay true, as mosquitto-config "
            "writes it) both turn Nagle off; with either left on the last row was ~42 ms",
        ],
    )
