"""Guards for the firmware update (an operator action over HTTP): it is never sent to a station
whose contactor is closed or whose vehicle charges, also when that began while the upload waited.

Each test names the mutation it kills. Everything goes through the admin API and a hand-driven
station (``ScriptedStation``), which the other guard files use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace

import aiohttp
import pytest
from conftest import RawStation, eventually, free_port, idle_data

from openwb_modbus_evse.evse import protocol as p

TOKEN = "guards-admin-token"
SERIAL = "10BA23AB50534D53302E3120FF162332"
IMAGE = bytes(range(256)) * 16  # 4 kB
CHARGING = idle_data(pilot=p.Pilot.C_6V, pwm=26, contactor=True, currents_ma=(15_600,) * 3)


class ScriptedStation:
    """A hand-driven station that answers every request from a background task.

    Data reports show ``data``; PWM and contactor commands are acknowledged and, if ``obey``,
    applied to ``data``. ``hold()`` keeps the next collect-data unanswered until the returned
    event is set (``holding`` is set once that request has arrived). A firmware upload is
    recorded and not answered, as by the firmware.
    """

    def __init__(self, raw: RawStation, data: p.StationData, obey: bool) -> None:
        self.raw, self.data, self.obey = raw, data, obey
        self.requests: list[p.Request] = []
        self.holding = asyncio.Event()
        self._hold: asyncio.Event | None = None
        self._task = asyncio.create_task(self._run())

    @classmethod
    async def connect(
        cls, rig, serial: str = SERIAL, data: p.StationData | None = None, obey: bool = True
    ) -> ScriptedStation:
        station = cls(
            await RawStation.connect(rig.bridge.link.port, serial), data or idle_data(), obey
        )
        await eventually(lambda: serial in rig.bridge.link.sessions)
        return station

    def hold(self) -> asyncio.Event:
        self.holding.clear()
        self._hold = asyncio.Event()
        return self._hold

    def received(self, kind: p.RequestType) -> list[p.Request]:
        return [r for r in self.requests if r.type is kind]

    async def _run(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, p.ProtocolError):
            while True:
                request = await self.raw.next_request(timeout=3600)
                self.requests.append(request)
                if request.type is p.RequestType.COLLECT_DATA:
                    if self._hold is not None:
                        gate, self._hold = self._hold, None
                        self.holding.set()
                        await gate.wait()
                    self.raw.send(p.encode_data(self.data, 4))
                elif request.type is p.RequestType.SET_PWM:
                    if self.obey:
                        self.data = replace(self.data, pwm=request.pwm)
                    self.raw.send(p.pwm_ack())
                elif request.type is p.RequestType.SET_CONTACTOR:
                    if self.obey:
                        self.data = replace(self.data, contactor=request.contactor)
                    self.raw.send(p.contactor_ack())
                elif request.type is p.RequestType.PING:
                    self.raw.send(p.pong())

    async def close(self) -> None:
        # The connection first: a cancel that arrives as a request does can be lost (wait_for
        # of Python 3.11), the end of the stream is not.
        await self.raw.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
def web_settings(settings):
    return replace(settings, metrics_host="127.0.0.1", metrics_port=free_port(), admin_token=TOKEN)


async def http(rig, method: str, path: str, **kw) -> tuple[int, dict]:
    """One admin API request with the token: (status, JSON body)."""
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}{path}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kw) as response,
    ):
        text = await response.text()
        return response.status, json.loads(text) if text.startswith(("{", "[")) else {}


async def listed(rig, serial: str) -> dict | None:
    """The station as ``GET /api/stations`` lists it (None: not listed)."""
    status, body = await http(rig, "GET", "/api/stations")
    assert status == 200, body
    rows = body["stations"] if isinstance(body, dict) and "stations" in body else body
    return next((row for row in rows if row["serial"] == serial), None)


async def until(check, timeout: float = 5.0) -> None:
    """Wait until the coroutine function ``check`` returns true."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def firmware_url(serial: str = SERIAL, timeout: float = 1.5) -> str:
    return f"/api/stations/{serial}/firmware?timeout={timeout:g}"


async def test_the_last_check_refuses_a_station_that_began_charging_while_the_upload_waited(
    make_rig, web_settings
):
    """The poll in flight holds the session: the upload waits for it. Its answer shows the
    vehicle charging, so the check made just before sending refuses the update.

    kills: ``session.upload_firmware(image, check)`` given a check that passes (the image is
    sent: 502 after the timeout instead of 409)."""
    rig = await make_rig(web_settings, lp_remember_after=60.0)
    station = await ScriptedStation.connect(rig, data=idle_data(pilot=p.Pilot.B_9V))
    gate = station.hold()
    await asyncio.wait_for(station.holding.wait(), 3)  # the bridge's next poll is in flight
    update = asyncio.create_task(http(rig, "POST", firmware_url(), data=IMAGE))

    async def remembered() -> bool:  # the action passed its first check, and remembered the LP
        row = await listed(rig, SERIAL)
        return bool(row and row["remembered"])

    await until(remembered)  # ... so it now waits for the session, behind the held poll
    station.data = CHARGING
    gate.set()
    status, body = await update
    assert status == 409 and "charging" in body["error"], (status, body)
    assert station.received(p.RequestType.FIRMWARE_UPLOAD) == []
    await station.close()


async def test_a_closed_contactor_refuses_the_update_and_a_move_even_if_the_vehicle_pauses(
    make_rig, web_settings
):
    """Contactor closed, vehicle at B (not asking for power), a station that does not open it:
    neither a firmware update nor a move.

    kills: ``_busy`` ignoring the contactor (only a charging vehicle counting)."""
    rig = await make_rig(web_settings)
    paused = idle_data(pilot=p.Pilot.B_9V, pwm=100, contactor=True)
    station = await ScriptedStation.connect(rig, data=paused, obey=False)
    status, body = await http(rig, "POST", firmware_url(timeout=1), data=IMAGE)
    assert status == 409 and "contactor" in body["error"], (status, body)
    assert station.received(p.RequestType.FIRMWARE_UPLOAD) == []
    status, body = await http(rig, "POST", f"/api/stations/{SERIAL}/move", json={"lp": 5})
    assert status == 409, (status, body)
    assert (await listed(rig, SERIAL))["lp"] == 1
    await station.close()
