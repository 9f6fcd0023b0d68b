"""``make demo``: the service, two virtual stations with vehicles, and a small controller.

Everything runs in one process, on the default ports unless told otherwise (and on loopback
only: the virtual stations are not for the LAN), so ``status --watch`` and ``/metrics`` work
without options. The controller writes the charging current like a PV-surplus controller would,
so the values keep changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from ..config import Settings, StationConfig
from ..control import MODBUS
from ..evse.protocol import Proximity
from ..interfaces.modbus.registers import REGISTER_MAP
from ..service import Service
from .simulator import VehicleConfig, VirtualStation, virtual_serial

log = logging.getLogger(__name__)


async def _controller(port: int, stop: asyncio.Event, drives: Callable[[int], bool]) -> None:
    """Every 5 s: LP1 follows a slow "sun" between 6 and 16 A, LP2 gets 10 A; only the LPs it
    ``drives`` (their controller is Modbus): one the owner took over is left alone, instead of a
    refused write in the log every 5 s."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port)
    await client.connect()
    step = 0
    try:
        while not stop.is_set():
            sun = 6 + 10 * (0.5 + 0.5 * math.sin(step / 6))
            for lp, amps in ((1, sun), (2, 10.0)):
                if not drives(lp):
                    continue
                await client.write_register(
                    REGISTER_MAP.address(lp, "set_current"), round(amps * 100), device_id=1
                )
            step += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
    finally:
        client.close()


async def run_demo(
    stop: asyncio.Event,
    state_db: str | None = None,
    host: str = "127.0.0.1",
    admin_token: str = "",
    mqtt: tuple[str, int] = ("", 1883),
    **ports: int,
) -> None:
    """Run everything until ``stop`` is set; ``ports`` override the default ports;
    ``admin_token`` turns the actions (page controls, CLI) on. With an MQTT broker (``mqtt``:
    host, port) the stations appear in Home Assistant, which drives LP2.

    Raises OSError (one line: which port) when a port is taken, e.g. by ``make run``.
    """
    with tempfile.TemporaryDirectory(prefix="openwb-modbus-evse-demo-") as tmp:
        serials = [virtual_serial(1), virtual_serial(2)]
        settings = Settings(
            state_db=state_db or str(Path(tmp) / "state.sqlite3"),
            evse_host=host,
            modbus_host=host,
            metrics_host=host,
            admin_token=admin_token,
            **ports,
            station=(
                StationConfig(serial=serials[0], lp=1, name="garage", max_current=16),
                StationConfig(
                    serial=serials[1],
                    lp=2,
                    name="carport",
                    phases=1,
                    cable="tethered",
                    controller="homeassistant" if mqtt[0] else None,
                ),
            ),
            mqtt_host=mqtt[0],
            mqtt_port=mqtt[1],
        )
        service = Service(settings)
        try:
            await service.start()
        except OSError:
            await service.stop()
            raise
        stations = [
            VirtualStation(
                serials[0],
                bridge=("127.0.0.1", service.link.port),
                vehicle=VehicleConfig(plug_in_after=3, max_current_a=16, phases=3),
                voltage_jitter_v=1.5,
                name="garage",
            ),
            VirtualStation(
                serials[1],
                bridge=("127.0.0.1", service.link.port),
                vehicle=VehicleConfig(plug_in_after=8, max_current_a=32, phases=1),
                proximity=Proximity.NO_CABLE,
                voltage_jitter_v=1.5,
                name="carport",
            ),
        ]
        for station in stations:
            await station.start()
        assert service.modbus is not None

        def drives(lp: int) -> bool:
            point = service.registry.at(lp)
            return point is not None and point.state.config.controller == MODBUS

        controller = asyncio.create_task(_controller(service.modbus.port, stop, drives))
        log.info(
            "demo running. In another terminal: .venv/bin/openwb-modbus-evse status --watch  "
            "|  curl -s localhost:%d/metrics | grep ^openwb  |  Ctrl-C stops",
            settings.metrics_port,
        )
        if admin_token:
            log.info(
                "demo: the page http://%s:%d/ and the CLI take the admin token %s "
                "(e.g. .venv/bin/openwb-modbus-evse stations --url http://%s:%d --token %s)",
                host,
                service.metrics_port,
                admin_token,
                host,
                service.metrics_port,
                admin_token,
            )
        await stop.wait()
        await controller
        await service.stop()
        for station in stations:
            await station.stop()
