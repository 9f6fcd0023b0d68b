"""The admin API and the CLI commands that use it: token checks, LP assignment."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import aiohttp
import pytest
from conftest import eventually, free_port, station_config

from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

TOKEN = "s3cret-token-for-tests"
ADDR = REGISTER_MAP.address
CLI = [sys.executable, "-m", "openwb_modbus_evse"]


@pytest.fixture
def web_settings(settings):
    from dataclasses import replace

    return replace(settings, metrics_host="127.0.0.1", metrics_port=free_port(), admin_token=TOKEN)


async def http(rig, method: str, path: str, token: str | None = TOKEN, **kw) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kw) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text) if text.startswith("{") else {"text": text}


async def cli(rig, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess:
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}"
    argv = [*CLI, *args[:1], "--url", url, "--token", token, *args[1:]]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=30)


# --- token checks ------------------------------------------------------------------------------


async def test_actions_are_off_without_a_configured_token(make_rig, web_settings):
    rig = await make_rig(web_settings, admin_token="")
    for token in (None, TOKEN, ""):
        status, body = await http(rig, "GET", "/api/stations", token=token)
        assert status == 403 and "admin_token" in body["error"]
    status, _ = await http(rig, "POST", f"/api/stations/{virtual_serial(1)}/forget", token=TOKEN)
    assert status == 403


async def test_no_token_wrong_token_and_token_on_read_only_routes(make_rig, web_settings, caplog):
    rig = await make_rig(web_settings)
    await rig.station(1)
    forget = f"/api/stations/{virtual_serial(1)}/forget"
    with caplog.at_level(logging.INFO, logger="openwb_modbus_evse.interfaces.http.actions"):
        status, body = await http(rig, "POST", forget, token=None)
        assert status == 401 and "admin token" in body["error"]
        status, body = await http(rig, "POST", forget, token="not-the-token-at-all")
        assert status == 403 and body["error"] == "wrong admin token"
        status, _ = await http(rig, "GET", "/api/stations", token="x" + TOKEN)
        assert status == 403
    assert rig.point(virtual_serial(1)).identity.lp == 1  # nothing happened
    refusals = [r.getMessage() for r in caplog.records]
    assert any("127.0.0.1 refused: no token" in m for m in refusals), refusals
    assert any("127.0.0.1 refused: wrong token" in m for m in refusals), refusals
    # read-only routes are open, with a token, a wrong one or none
    for token in (TOKEN, "wrong", None):
        for path in ("/api/status", "/metrics", "/"):
            status, _ = await http(rig, "GET", path, token=token)
            assert status == 200, (path, token)


async def test_a_flood_of_wrong_tokens_is_logged_rate_limited(make_rig, web_settings, caplog):
    rig = await make_rig(web_settings)
    with caplog.at_level(logging.WARNING, logger="openwb_modbus_evse.interfaces.http.actions"):
        for i in range(50):
            status, _ = await http(rig, "GET", "/api/stations", token="guess")
            assert status == (403 if i < 5 else 429)  # then throttled (test_http_origin)
    assert len(caplog.records) <= 6


# --- LP assignment -----------------------------------------------------------------------------


async def test_list_move_and_forget_stations_from_the_cli(make_rig, web_settings, caplog):
    rig = await make_rig(web_settings, station=(station_config(3, lp=5),))
    client = await rig.client()
    vehicle = VehicleConfig(plug_in_after=0.0, reaction_s=0.05)
    one = await rig.station(1, vehicle)
    two = await rig.station(2, VehicleConfig(plug_in_after=None))
    serial = one.serial
    # a new station's LP is remembered once it stayed lp_remember_after
    await eventually(lambda: serial in rig.bridge.registry.store.lp_assignments())

    done = await cli(rig, "stations", "--json")
    assert done.returncode == 0, done.stderr
    listed = {s["serial"]: s for s in json.loads(done.stdout)}
    assert listed[serial]["lp"] == 1 and listed[serial]["connected"]
    assert listed[serial]["remembered"] and not listed[serial]["configured"]
    assert listed[virtual_serial(3)]["configured"] and not listed[virtual_serial(3)]["connected"]
    done = await cli(rig, "stations")
    assert done.returncode == 0 and serial in done.stdout and "state file" in done.stdout

    # charging: refused, nothing changes
    rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    await one.wait_for(lambda s: s.contactor)
    await eventually(lambda: bool(rig.point(serial).state.data.contactor))
    done = await cli(rig, "move", serial, "4")
    assert done.returncode != 0 and "is charging; stop it first" in done.stderr
    assert rig.point(serial).identity.lp == 1

    # stopped: moved at once, Modbus serves it on LP4, LP1 is free
    rr = await client.write_register(ADDR(1, "set_current"), 0, device_id=1)
    assert not rr.isError()
    await one.wait_for(lambda s: not s.contactor)
    await eventually(lambda: not rig.point(serial).state.data.contactor)
    with caplog.at_level(logging.INFO, logger="openwb_modbus_evse.interfaces.http.actions"):
        done = await cli(rig, "move", serial, "4")
    assert done.returncode == 0, done.stderr
    assert any(f"action move {serial} by 127.0.0.1: done" in r.getMessage() for r in caplog.records)
    rr = await client.read_input_registers(ADDR(4, "serial_number"), count=10, device_id=1)
    assert not rr.isError()
    assert REGISTER_MAP.decode([0] * 50 + rr.registers + [0] * 40)[
        "serial_number"
    ] == rig.serial_number(serial)
    rr = await client.read_input_registers(ADDR(1, "power"), count=2, device_id=1)
    assert rr.isError() and rr.exception_code == 2
    assert rig.bridge.registry.store.lp_assignments()[serial] == 4
    assert rig.point(serial).name == "LP4"

    # refusals: taken LP, configured station, unknown station, bad LP
    done = await cli(rig, "move", serial, "2")
    assert done.returncode != 0 and "LP2 is taken by LP2" in done.stderr
    done = await cli(rig, "move", virtual_serial(3), "6")
    assert done.returncode != 0 and "in the config file" in done.stderr
    done = await cli(rig, "move", virtual_serial(9), "6")
    assert done.returncode != 0 and "404" in done.stderr
    status, _ = await http(rig, "POST", f"/api/stations/{serial}/move", json={"lp": 244})
    assert status == 400
    status, _ = await http(rig, "POST", f"/api/stations/{serial}/move", data=b"{nope")
    assert status == 400

    # forget: refused while connected; once gone, the LP is free and the energy kept
    done = await cli(rig, "forget", two.serial)
    assert done.returncode != 0 and "is connected" in done.stderr
    await two.stop()
    await eventually(lambda: not rig.point(two.serial).state.connected)
    done = await cli(rig, "forget", two.serial)
    assert done.returncode == 0, done.stderr
    assert rig.bridge.registry.at(2) is None and rig.bridge.registry.get(two.serial) is None
    assert two.serial not in rig.bridge.registry.store.lp_assignments()

    # after a restart the station keeps its new LP
    await rig.close()
    rig = await make_rig(web_settings, station=(station_config(3, lp=5),))
    again = await rig.station(1, VehicleConfig(plug_in_after=None))
    assert rig.point(again.serial).identity.lp == 4


# --- firmware update ---------------------------------------------------------------------------

IMAGE = bytes(range(256)) * 1000  # 256 kB


async def test_firmware_update_end_to_end_keeps_lp_energy_and_settings(
    make_rig, web_settings, tmp_path
):
    rig = await make_rig(web_settings)
    client = await rig.client()
    station = await rig.station(2, VehicleConfig(plug_in_after=None), firmware_after_update=5)
    serial = station.serial
    rr = await client.write_register(ADDR(1, "set_current"), 1000, device_id=1)
    assert not rr.isError()
    point = rig.point(serial)
    point.energy.wh = 1234.5  # as if it had charged
    path = tmp_path / "firmware.bin"
    path.write_bytes(IMAGE)
    done = await cli(rig, "firmware", serial, str(path), "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert "with firmware 5 (was 4)" in done.stdout
    assert station.uploads == [IMAGE]  # the virtual station checked the CRC
    assert station.connections == 2 and station.firmware == 5
    assert rig.bridge.link.sessions[serial].firmware == 5
    assert point is rig.point(serial) and point.identity.lp == 1
    assert point.energy.wh >= 1234.5 and point.state.requested_ca == 1000


async def test_firmware_refusals(make_rig, web_settings):
    rig = await make_rig(web_settings)
    client = await rig.client()
    station = await rig.station(1, VehicleConfig(plug_in_after=0.0, reaction_s=0.05))
    url = f"/api/stations/{station.serial}/firmware?timeout=5"
    # empty, and larger than a station holds (1 MiB)
    status, body = await http(rig, "POST", url, data=b"")
    assert status == 400 and "empty" in body["error"]
    status, body = await http(rig, "POST", url, data=b"x" * (1024 * 1024 + 1))
    assert status == 413 and "1048576" in body["error"]
    status, body = await http(rig, "POST", url.replace("=5", "=9999"), data=IMAGE)
    assert status == 400
    status, _ = await http(rig, "POST", f"/api/stations/{virtual_serial(7)}/firmware", data=IMAGE)
    assert status == 404
    # charging: refused, nothing sent
    rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    await station.wait_for(lambda s: s.contactor)
    await eventually(lambda: bool(rig.point(station.serial).state.data.contactor))
    status, body = await http(rig, "POST", url, data=IMAGE)
    assert status == 409 and "charging" in body["error"]
    assert station.uploads == [] and station.connections == 1
    # no token: refused before the image is even read
    status, _ = await http(rig, "POST", url, token=None, data=IMAGE)
    assert status == 401


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [("ignore", "still connected"), ("die", "did not come back")],
)
async def test_firmware_update_that_does_not_come_back_is_an_error(
    make_rig, web_settings, behaviour, message
):
    rig = await make_rig(web_settings)
    station = await rig.station(1, VehicleConfig(plug_in_after=None), firmware_update=behaviour)
    url = f"/api/stations/{station.serial}/firmware?timeout=1.5"
    status, body = await http(rig, "POST", url, data=IMAGE)
    assert status == 502 and message in body["error"], body
    assert station.uploads == [IMAGE]
