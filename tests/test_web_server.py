"""The HTTP server: bounded connections, scrapes that cannot starve the stations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import pytest
from conftest import eventually, free_port

from openwb_modbus_evse.history import PowerHistory
from openwb_modbus_evse.interfaces.http import server as web_server
from openwb_modbus_evse.interfaces.http.throttle import Throttled
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP

P = "openwb_modbus_evse_"


@pytest.fixture
async def rig(make_rig, settings):
    return await make_rig(settings, metrics_host="127.0.0.1", metrics_port=free_port())


async def scrape_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


async def test_300_simultaneous_scrapes_keep_every_station_session(rig):
    stations = [await rig.station(i) for i in range(1, 6)]
    client = await rig.client()
    opened_before = [s.connections for s in stations]
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/metrics"
    made_before = rig.bridge.web.exposition.made
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = await asyncio.gather(*(scrape_status(session, url) for _ in range(300)))
        # Modbus is answered meanwhile and afterwards
        rr = await client.read_input_registers(REGISTER_MAP.address(1, "power"), count=2)
        assert not rr.isError()
        assert await scrape_status(session, url) == 200
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= web_server.MAX_PER_ADDRESS
    # from one address at most MAX_PER_ADDRESS are served at once; the rest got a quick 503
    assert statuses.count(503) > 0
    assert rig.bridge.web.gate.peak == web_server.MAX_PER_ADDRESS
    # the exposition is shared by scrapes that pile up rather than rebuilt for each
    assert rig.bridge.web.exposition.made - made_before < statuses.count(200) + 1
    assert [s.connections for s in stations] == opened_before
    assert all(s.serial in rig.bridge.link.sessions for s in stations)


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _refused(reader: asyncio.StreamReader) -> bool:
    answer = await asyncio.wait_for(reader.read(), 3)
    return answer.startswith(b"HTTP/1.1 503")


async def test_connection_caps_per_address_and_in_total(rig, monkeypatch):
    port = rig.bridge.metrics_port
    limiter = rig.bridge.web.gate.limiter
    monkeypatch.setattr(limiter, "max_total", 20)
    monkeypatch.setattr(limiter, "max_per_address", 8)
    idle = []
    try:
        # idle connections that never send a request (slowloris) from one address ...
        for _ in range(limiter.max_per_address):
            idle.append(await _connect(port, "127.0.0.2"))
        await asyncio.sleep(0.1)
        assert limiter.open == limiter.max_per_address
        reader, writer = await _connect(port, "127.0.0.2")
        assert await _refused(reader)
        writer.close()
        # ... do not lock out another address, until the total cap is reached
        for source in ("127.0.0.3", "127.0.0.3", "127.0.0.5") * 4:
            idle.append(await _connect(port, source))
        await asyncio.sleep(0.1)
        reader, writer = await _connect(port, "127.0.0.4")
        assert await _refused(reader)
        writer.close()
        assert limiter.open == limiter.max_total
    finally:
        for _, writer in idle:
            writer.close()
    # closed connections free their slots; the refusals are counted by reason
    await eventually(lambda: limiter.open == 0)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    assert 'connections_refused_total{listener="http",reason="per_address"} 1.0' in text
    assert 'connections_refused_total{listener="http",reason="total"} 1.0' in text
    assert 'openwb_modbus_evse_connections{listener="http"} 1.0' in text  # this scrape


async def test_a_connection_that_never_finishes_is_closed_after_its_lifetime(make_rig, settings):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(web_server, "CONNECTION_MAX_AGE", 0.3)
        rig = await make_rig(settings, metrics_host="127.0.0.1", metrics_port=free_port())
    reader, writer = await _connect(rig.bridge.metrics_port, "127.0.0.1")
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
    writer.close()
    await eventually(lambda: rig.bridge.web.gate.limiter.open == 0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.step = 0.0  # added on every read: how long a generation "takes"

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_exposition_is_shared_by_scrapes_that_pile_up_and_never_older_than_them():
    value = [1]
    taken_on, encoded_on = set(), set()

    def take():
        taken_on.add(threading.get_ident())
        return value[0]

    def encode(taken):
        encoded_on.add(threading.get_ident())
        return f"value {taken}".encode()

    clock = FakeClock()
    worker = ThreadPoolExecutor(1)
    exposition = Throttled(take, encode, worker, clock)
    clock.step = 0.01  # 10 ms per generation: the next one starts 100 ms later at the earliest
    assert await exposition.body() == b"value 1"
    clock.step = 0.0
    value[0] = 2  # changed after the first scrape: later scrapes must show it
    waiting = [asyncio.create_task(exposition.body()) for _ in range(50)]
    await asyncio.sleep(0.02)
    assert not any(t.done() for t in waiting)  # they wait for the next generation ...
    bodies = await asyncio.wait_for(asyncio.gather(*waiting), 2)
    assert all(b == b"value 2" for b in bodies)  # ... and see the value of their time
    assert exposition.made == 2
    # The snapshot is taken on the event loop; only the encoding runs in the worker thread.
    assert taken_on == {threading.get_ident()} and threading.get_ident() not in encoded_on
    exposition.close()
    worker.shutdown()


async def test_a_broken_collector_answers_500_and_the_next_scrape_works(rig, monkeypatch):
    calls = []

    def broken(snapshot):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("collector bug")
        return b"ok\n"

    monkeypatch.setattr(rig.bridge.web.exposition, "_encode", broken)
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session:
        with contextlib.suppress(aiohttp.ClientError):
            assert await scrape_status(session, url) == 500
        assert await scrape_status(session, url) == 200


# --- the status page's JSON ------------------------------------------------------------------


def test_power_history_is_bounded_and_forgets_gone_stations():
    history = PowerHistory(interval=5, bucket=60, window=600)
    assert history.size == 10
    for i in range(0, 1200, 5):  # 20 minutes, a sample every 5 s
        history.sample([("A", 1000.4 + i // 60), ("B", None)], at=float(i))
    start, values = history.series("A")
    assert len(values) == 10 and start == 600.0  # the last 10 minutes, the open one included
    assert values[0] == 1010 and values[-1] == 1019  # average W of each minute
    assert history.series("B") == (600.0, (None,) * 10)  # no data: a gap in the chart
    history.sample([("A", 5.0)], at=1200.0)
    assert history.series("B") == (0.0, ())


async def get_json(rig, path: str) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{rig.bridge.metrics_port}{path}") as response,
    ):
        assert response.status == 200
        return await response.json()


async def test_status_json_shows_each_charge_point_as_modbus_does(rig):
    client = await rig.client()
    station = await rig.station(1)
    await station.wait_for(lambda s: s.plugged)
    rr = await client.write_register(REGISTER_MAP.address(1, "set_current"), 1000, device_id=1)
    assert not rr.isError()
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    point = rig.point(station.serial)
    await eventually(lambda: bool(point.state.data and point.state.data.currents_ma[0]))
    status = await get_json(rig, "/api/status")
    (cp,) = status["charge_points"]
    rr = await client.read_input_registers(REGISTER_MAP.address(1, "power"), count=17)
    regs = REGISTER_MAP.decode(rr.registers + [0] * 83)
    assert cp["lp"] == 1 and cp["name"] == "LP1" and cp["connected"] and cp["fresh"]
    assert cp["plugged"] and cp["charging"] and cp["contactor"] and cp["pilot"] == "C"
    assert cp["requested_a"] == 10 and cp["allowed_a"] == 10
    assert cp["offered_a"] == regs["offered_current"] == 9.6
    assert cp["power_w"] == regs["power"]
    assert cp["currents_a"] == [regs["current_l1"], regs["current_l2"], regs["current_l3"]]
    assert cp["energy_wh"] == regs["energy_imported"]
    assert cp["firmware"] == 4 and cp["rssi_dbm"] == -62 and cp["controller"] == "modbus"
    assert cp["serial_number"] == rig.serial_number(station.serial)
    assert station.serial not in json.dumps(status)  # no full station ID for anyone on the LAN
    assert "contactor on" in cp["log"]
    assert 0 <= cp["heartbeat_age_s"] < 5 and not cp["heartbeat_lapsed"]
    assert cp["heartbeat_source"] == "127.0.0.1"  # the Modbus client that wrote

    # kept after it leaves once its LP is remembered (lp_remember_after)
    await eventually(lambda: station.serial in rig.bridge.registry.store.lp_assignments())
    await station.stop()
    await eventually(lambda: not point.state.connected)
    (cp,) = (await get_json(rig, "/api/status"))["charge_points"]
    assert not cp["connected"] and not cp["fresh"] and cp["power_w"] == 0  # as the register
    assert cp["voltages_v"] == [None, None, None] and cp["plugged"]  # plug state held
    assert cp["firmware"] is None and not cp["charging"]


async def test_status_json_is_shared_by_requests_that_pile_up(rig):
    await rig.station(1)
    made = rig.bridge.web.status.made
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/api/status"
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(scrape_status(session, url) for _ in range(30)))
    assert statuses == [200] * 30
    assert rig.bridge.web.status.made - made < 30


async def test_page_files_are_served_without_anything_from_elsewhere(rig):
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{rig.bridge.metrics_port}"
        for path, kind in (
            ("/", "text/html"),
            ("/app.js", "text/javascript"),
            ("/style.css", "text/css"),
        ):
            async with session.get(base + path) as response:
                assert response.status == 200 and response.content_type == kind
                text = await response.text()
                assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
                assert "https://" not in text


def test_serve_answers_http_on_its_own_event_loop(tmp_path):
    """`serve` runs on uvloop when it is installed: the HTTP server must work there too."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    argv = [sys.executable, "-m", "openwb_modbus_evse", "serve", "--evse-host", "127.0.0.1"]
    argv += ["--evse-port", "0", "--modbus-port", "0", "--metrics-host", "127.0.0.1"]
    argv += ["--metrics-port", str(port), "--state-db", str(tmp_path / "state.sqlite3")]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    assert r.status == 200 and b"openwb_modbus_evse_station_sessions" in r.read()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200 and b"<title>" in r.read()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
