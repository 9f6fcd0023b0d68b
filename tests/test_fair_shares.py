"""Fair shares in the connection caps: a full listener makes room instead of locking out.

The three floods the issue found, end to end on loopback (the choice on its own:
test_fair_choice.py): Linux routes all of 127.0.0.0/8 to lo, so clients bound to
127.0.0.2.. are different addresses to the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import aiohttp
import pytest
from conftest import FAST, RawStation, eventually, free_port, metric, station_config
from pymodbus.client import AsyncModbusTcpClient

from openwb_modbus_evse.interfaces.http import server as web_server
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP, lp_base
from openwb_modbus_evse.tools.simulator import VirtualStation

SET_CURRENT = REGISTER_MAP.address(1, "set_current")
P = "openwb_modbus_evse_"


# --- end to end -------------------------------------------------------------------------------


def _read_request(transaction: int) -> bytes:
    """A raw Modbus TCP read of LP1's first register (unit 1)."""
    return struct.pack(">HHHBBHH", transaction, 0, 6, 1, 4, lp_base(1), 1)


async def _open(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def _sources(count: int) -> list[str]:
    return [f"127.0.0.{i}" for i in range(2, 2 + count)]


@contextlib.asynccontextmanager
async def _flood(port: int, sources: list[str], per_address: int, first: bytes = b""):
    """``per_address`` connections from each source, each sending ``first`` (nothing: they
    stay half-open), then idle; all closed at the end."""
    writers = []
    try:
        for _ in range(per_address):
            for source in sources:
                _, writer = await _open(port, source)
                if first:
                    writer.write(first)
                writers.append(writer)
        await asyncio.sleep(0.2)  # the service has taken them all
        yield writers
    finally:
        for writer in writers:
            writer.close()


def _evicted(rig, listener: str, reason: str = "") -> float:
    """Connections closed to make room (reason "half_open", "idle", or "": both)."""
    reasons = [reason] if reason else ["half_open", "idle"]
    name = f"{P}connections_evicted_total"
    return sum(metric(rig.bridge, name, listener=listener, reason=r) or 0.0 for r in reasons)


async def test_a_modbus_flood_keeps_neither_a_controller_nor_a_new_one_out(make_rig, settings):
    """20 addresses x idle connections fill the Modbus port (issue 19: 9 x 8 locked every
    controller out). The controller that wrote keeps its connection; a new one gets in."""
    rig = await make_rig(settings, modbus_max_connections=20, modbus_max_per_address=2)
    await rig.station(1)
    controller = await rig.client()
    assert not (await controller.write_register(SET_CURRENT, 1600, device_id=1)).isError()
    limiter = rig.bridge.modbus.limiter
    # Each flood connection asks once (a slot kept with one request per 300 s), then idles.
    async with _flood(rig.modbus_port, _sources(20), per_address=2, first=_read_request(7)):
        assert limiter.open == 20
        rr = await controller.read_input_registers(lp_base(1), count=10, device_id=1)
        assert not rr.isError()  # the controller that wrote kept its place
        assert not (await controller.write_register(SET_CURRENT, 1000, device_id=1)).isError()
        newcomer = AsyncModbusTcpClient("127.0.0.1", port=rig.modbus_port, timeout=2, retries=0)
        try:
            assert await newcomer.connect()
            rr = await newcomer.read_input_registers(lp_base(1), count=10, device_id=1)
            assert not rr.isError()  # a new controller is answered during the flood
            assert not (await newcomer.write_register(SET_CURRENT, 1200, device_id=1)).isError()
        finally:
            newcomer.close()
        assert limiter.open <= 20
        assert _evicted(rig, "modbus") >= 21  # 40 + 1 came, 20 fit


async def test_an_http_flood_does_not_keep_a_scrape_out(make_rig, settings):
    """Idle keep-alive and never-finished connections from 5 addresses fill the HTTP port;
    /metrics and the status page are still served to a new client."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(web_server, "MAX_CONNECTIONS", 20)
        mp.setattr(web_server, "MAX_PER_ADDRESS", 8)
        rig = await make_rig(settings, metrics_host="127.0.0.1", metrics_port=free_port())
    port = rig.bridge.metrics_port
    limiter = rig.bridge.web.gate.limiter
    request = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with (
        _flood(port, _sources(5), per_address=4, first=request),  # answered, then kept alive
        _flood(port, _sources(5), per_address=4),  # never send a byte
    ):
        assert limiter.open == 20
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status == 200, path
                    await response.read()
        assert _evicted(rig, "http", "half_open") >= 1


async def test_half_open_station_connections_do_not_keep_a_new_station_out(make_rig, settings):
    """19 addresses with connections that never send a handshake fill the station port (issue
    19: they kept a new station out); a new station is served, a known one keeps its place."""
    rig = await make_rig(
        settings,
        evse_max_connections=20,
        evse_max_per_address=2,
        station=(station_config(1, lp=1),),
    )
    known = await rig.station(1)
    link = rig.bridge.link
    async with _flood(link.port, _sources(19), per_address=2):
        assert link.limiter.open == 20
        assert known.serial in link.sessions  # a known station keeps its connection
        newcomer = await rig.station(2)  # served during the flood
        assert _evicted(rig, "evse", "half_open") >= 19
        # More of them: the registered stations are past their handshake, the silent ones go.
        async with _flood(link.port, _sources(19), per_address=1):
            assert {known.serial, newcomer.serial} <= set(link.sessions)
            assert link.limiter.open == 20


async def test_a_known_station_that_reconnects_during_a_flood_is_served(make_rig, settings):
    """The connection of a known station drops while silent connections fill the port, and
    they take its slot at once; when it comes back, it is served."""
    rig = await make_rig(
        settings,
        evse_max_connections=20,
        evse_max_per_address=2,
        station=(station_config(1, lp=1),),
    )
    known = await rig.station(1)
    link = rig.bridge.link
    async with _flood(link.port, _sources(19), per_address=1):
        await known.stop()
        await eventually(lambda: known.serial not in link.sessions)
        async with _flood(link.port, _sources(19), per_address=1):  # its slot is taken
            assert link.limiter.open == 20
            again = await rig.station(1)  # reconnects during the flood
            assert again.serial in link.sessions and link.limiter.open == 20


async def test_a_silent_connection_cannot_take_the_place_of_a_registered_station(
    make_rig, settings
):
    """At the per-address cap, a station address's silent connection makes room, not the
    station's session (stations behind one NAT address)."""
    rig = await make_rig(settings, evse_max_connections=100, evse_max_per_address=2)
    station = await rig.station(1)
    silent = await RawStation.connect(rig.bridge.link.port)
    other = await RawStation.connect(rig.bridge.link.port)  # the same address: the cap
    assert await silent.closed_by_peer()
    await asyncio.sleep(0.1)
    assert station.serial in rig.bridge.link.sessions and rig.bridge.link.limiter.open == 2
    await other.close()


async def test_a_peer_that_claims_a_known_id_does_not_keep_the_station_out(make_rig, settings):
    """Anyone can send a known station's ID: from elsewhere it is a claim (held safe until the
    owner confirms it), and such a session does not keep its place against the station."""
    rig = await make_rig(settings, evse_max_connections=1, station=(station_config(1, lp=1),))
    registry, link = rig.bridge.registry, rig.bridge.link
    real = await rig.station(1)  # seen at 127.0.0.1
    serial = real.serial
    await real.stop()
    await eventually(lambda: registry.session(serial) is None)
    claimant = VirtualStation(serial, bridge=("127.0.0.1", link.port), source="127.0.0.2", **FAST)
    await claimant.start()
    try:
        await eventually(lambda: registry.claim(serial) is not None)
        assert link.limiter.open == 1  # the claimant holds the only place
        back = await rig.station(1)  # from where it is known
        await eventually(
            lambda: (s := registry.session(serial)) is not None and s.host == "127.0.0.1"
        )
        assert registry.claim(serial) is None and back.serial == serial
    finally:
        await claimant.stop()
