"""A Modbus controller's side: the pymodbus client calls every part makes on LP1."""

from __future__ import annotations

import asyncio
import time

from pymodbus.client import AsyncModbusTcpClient

from bench.processes import HOST
from bench.report import BenchError
from openwb_modbus_evse.interfaces.modbus.registers import LP_STRIDE, REGISTER_MAP, lp_base

LP = 1
BLOCK_START = lp_base(LP)
BLOCK_SIZE = LP_STRIDE  # the whole LP block
SET_CURRENT = REGISTER_MAP.address(LP, "set_current")
DEVICE_ID = 1
READ_EVERY = 0.02  # seconds between a watching controller's Modbus reads


async def modbus_client(port: int) -> AsyncModbusTcpClient:
    """A connected pymodbus client."""
    client = AsyncModbusTcpClient(HOST, port=port, timeout=3, retries=0)
    if not await client.connect():
        raise BenchError(f"cannot connect a Modbus client to port {port}")
    return client


async def read_block(client: AsyncModbusTcpClient) -> bool:
    """Read LP1's whole block with function code 4; True if it was answered without error."""
    rr = await client.read_input_registers(BLOCK_START, count=BLOCK_SIZE, device_id=DEVICE_ID)
    return not rr.isError()


async def wait_for_lp(client: AsyncModbusTcpClient, timeout: float = 15.0) -> None:
    """Wait until LP1 is served (its station has registered with the bridge)."""
    async with asyncio.timeout(timeout):
        while not await read_block(client):
            await asyncio.sleep(0.05)


async def write_current(client: AsyncModbusTcpClient, centiamps: int) -> None:
    """Write the set-current register of LP1 with function code 6."""
    rr = await client.write_register(SET_CURRENT, centiamps, device_id=DEVICE_ID)
    if rr.isError():
        raise BenchError(f"writing {centiamps} to {SET_CURRENT} failed: {rr}")


async def controller_reads(client: AsyncModbusTcpClient, seconds: float) -> tuple[list[float], int]:
    """Read LP1's block every READ_EVERY s for ``seconds``; (latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            ok = await read_block(client)
        except Exception:  # a timeout counts like an exception response
            ok = False
        latencies.append(time.perf_counter() - t0)
        errors += not ok
        await asyncio.sleep(READ_EVERY)
    return latencies, errors
