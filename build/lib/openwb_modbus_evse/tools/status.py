"""``openwb-modbus-evse status``: a Modbus client for any openWB Rev2.0 secondary.

It reads the way evcc and openWB's own tester do (function code 4, whole LP blocks), so it works
against this project's service and against a real openWB alike. Note that on a real openWB every
read also refreshes the Modbus heartbeat, so ``--watch`` keeps it alive.

Which interface controls each LP is not in the openWB register layout: it comes from this
service's metrics (``controller_info``) when they answer on ``metrics_port``, else it shows "-".
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from ..config import MAX_LP
from ..interfaces.modbus.registers import LP_STRIDE, REGISTER_MAP, Value, lp_base

_HARDWARE_TYPES = (1, 2)  # series2, Pro; a real openWB serves zeros for LPs it does not have
_CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, then clear


class StatusError(Exception):
    """The secondary cannot be reached or does not answer."""


Phases = tuple[float | None, float | None, float | None]


@dataclass(frozen=True)
class LpStatus:
    """One charge point as read; None where the secondary serves -1 (invalid)."""

    lp: int
    serial: str
    plugged: bool
    charging: bool
    offered_a: float | None
    voltages_v: Phases
    currents_a: Phases
    power_w: int | None
    energy_wh: int | None
    controller: str | None = None  # None: unknown (not this service, or its metrics are off)


async def read_status(
    host: str,
    port: int = 1502,
    unit: int = 1,
    timeout: float = 3.0,
    metrics_port: int | None = None,
) -> list[LpStatus]:
    """Read LP1..LP9 and return the charge points that are present, in LP order.

    With ``metrics_port``, each row also says which interface controls it (if that answers).
    Raises StatusError when the host cannot be reached or stops answering.
    """
    # No retries and no background reconnects: a one-shot reader should fail fast and say why.
    client = AsyncModbusTcpClient(
        host, port=port, timeout=timeout, retries=0, reconnect_delay=0, name="status"
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        if not await client.connect():
            if loop.time() - started >= timeout:
                reason = f"no connection within {timeout:g} s"
            else:
                reason = await _connect_error(host, port, timeout)
            raise StatusError(f"cannot reach {_endpoint(host, port)}: {reason}")
        rows = []
        for lp in range(1, MAX_LP + 1):
            try:
                result = await client.read_input_registers(
                    lp_base(lp), count=LP_STRIDE, device_id=unit
                )
            except ModbusIOException as exc:
                raise StatusError(
                    f"cannot reach {_endpoint(host, port)}: "
                    f"no answer from unit {unit} within {timeout:g} s"
                ) from exc
            except ModbusException as exc:
                raise StatusError(f"cannot reach {_endpoint(host, port)}: {exc}") from exc
            # An exception response (e.g. illegal address) is how a secondary says "no such LP".
            if result.isError() or len(result.registers) < LP_STRIDE:
                continue
            row = _lp_status(lp, REGISTER_MAP.decode(result.registers))
            if row is not None:
                rows.append(row)
    finally:
        client.close()
    if metrics_port and rows:
        controllers = await asyncio.to_thread(_controllers, host, metrics_port, timeout)
        rows = [dataclasses.replace(row, controller=controllers.get(row.lp)) for row in rows]
    return rows


def _controllers(host: str, port: int, timeout: float) -> dict[int, str]:
    """LP -> controller, from this service's ``controller_info`` metric; {} if unavailable."""
    url = f"http://{_endpoint(host, port)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=min(timeout, 1.0)) as response:
            text = response.read(4_000_000).decode()
        found = {}
        for family in text_string_to_metric_families(text):
            if family.name == "openwb_modbus_evse_controller_info":
                for sample in family.samples:
                    if sample.labels.get("lp", "").isdigit():
                        found[int(sample.labels["lp"])] = sample.labels["controller"]
        return found
    except (OSError, ValueError, KeyError):  # not this service, or not reachable: unknown
        return {}


async def _connect_error(host: str, port: int, timeout: float) -> str:
    # pymodbus only reports that connecting failed; a plain connect tells us why.
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"no connection within {timeout:g} s"
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    except OSError as exc:
        # asyncio's message repeats host and port; the errno text is the useful part.
        return os.strerror(exc.errno) if exc.errno else str(exc)
    writer.close()
    return "connection failed"


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _lp_status(lp: int, values: dict[str, Value]) -> LpStatus | None:
    if values["hardware_type"] not in _HARDWARE_TYPES:
        return None

    def number(name: str) -> float | None:
        value = values[name]
        return float(value) if isinstance(value, int | float) else None

    def integer(name: str) -> int | None:
        value = values[name]
        return int(value) if isinstance(value, int | float) else None

    def phases(prefix: str) -> Phases:
        return (number(f"{prefix}_l1"), number(f"{prefix}_l2"), number(f"{prefix}_l3"))

    return LpStatus(
        lp=lp,
        serial=str(values["serial_number"] or ""),
        plugged=values["plugged"] == 1,
        charging=values["charging"] == 1,
        offered_a=number("offered_current"),
        voltages_v=phases("voltage"),
        currents_a=phases("current"),
        power_w=integer("power"),
        energy_wh=integer("energy_imported"),
    )


_HEADER = (
    "LP",
    "serial",
    "plugged",
    "charging",
    "offered A",
    "L1 V",
    "L2 V",
    "L3 V",
    "L1 A",
    "L2 A",
    "L3 A",
    "power W",
    "energy kWh",
    "controller",
)
_LEFT_ALIGNED = {"LP", "serial", "plugged", "charging", "controller"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(row: LpStatus) -> tuple[str, ...]:
    energy_kwh = None if row.energy_wh is None else row.energy_wh / 1000
    return (
        f"LP{row.lp}",
        row.serial or "-",
        "yes" if row.plugged else "no",
        "yes" if row.charging else "no",
        _fmt(row.offered_a, ".2f"),
        *(_fmt(v, ".1f") for v in row.voltages_v),
        *(_fmt(a, ".2f") for a in row.currents_a),
        _fmt(row.power_w, "d"),
        _fmt(energy_kwh, ".3f"),
        row.controller or "-",
    )


def format_table(rows: list[LpStatus]) -> str:
    """An aligned text table, one line per charge point; "-" marks invalid values."""
    if not rows:
        return f"no charge points answer (LP1..LP{MAX_LP})"
    table = [_HEADER, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if name in _LEFT_ALIGNED else cell.rjust(width)
            for name, cell, width in zip(_HEADER, line, widths, strict=True)
        ).rstrip()
        for line in table
    )


def to_json(rows: list[LpStatus], *, indent: int | None = 2) -> str:
    """A JSON list with one object per charge point (field names as in LpStatus, null = invalid)."""
    return json.dumps([dataclasses.asdict(row) for row in rows], indent=indent)


@contextmanager
def _quiet_pymodbus() -> Iterator[None]:
    # pymodbus logs every failed connect and timeout itself; we report them in one line.
    logger = logging.getLogger("pymodbus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(
    host: str,
    port: int,
    unit: int,
    *,
    watch: bool = False,
    interval: float = 2.0,
    as_json: bool = False,
    timeout: float = 3.0,
    metrics_port: int | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the status once (or refresh it every ``interval`` s with ``watch``); the exit code.

    In watch mode JSON is printed one document per line (JSON Lines); a table refreshes in
    place on a terminal and is repeated after a blank line otherwise. An unreachable
    secondary prints one error line to stderr and returns 1, also while watching.
    """
    tty = out.isatty()
    first = True
    try:
        with _quiet_pymodbus():
            while True:
                rows = asyncio.run(read_status(host, port, unit, timeout, metrics_port))
                if as_json:
                    text = to_json(rows, indent=None if watch else 2) + "\n"
                elif watch:
                    stamp = time.strftime("%H:%M:%S")
                    heading = f"{_endpoint(host, port)} unit {unit}, {stamp} (Ctrl-C to stop)"
                    text = f"{heading}\n{format_table(rows)}\n"
                    if tty:
                        text = _CLEAR_SCREEN + text
                    elif not first:
                        text = "\n" + text
                else:
                    text = format_table(rows) + "\n"
                out.write(text)
                out.flush()
                if not watch:
                    return 0
                first = False
                time.sleep(interval)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
