"""The power history: minutes averaged, gaps, and kept in the state file across a restart."""

from __future__ import annotations

import time
from dataclasses import replace

import aiohttp
from conftest import eventually, free_port

from openwb_modbus_evse.history import RECORD, PowerHistory
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.store import Store
from openwb_modbus_evse.tools.simulator import virtual_serial


def test_minutes_are_averaged_and_a_gap_is_none():
    history = PowerHistory(bucket=60, window=3600)
    for t, watts in ((0, 1000.0), (30, 3000.0), (60, None), (200, 500.0)):
        history.sample([("A", watts)], at=float(t))
    start, values = history.series("A")
    assert start == 0.0 and values == (2000, None, None, 500)  # minute 2: no sample at all
    records = history.changed_records()
    assert records == {RECORD + "A": {"end": 2, "w": [2000, None]}}  # minute 3 is open
    assert history.changed_records() == {}  # a batch writes only what changed since


def test_a_long_gap_clears_the_ring_and_the_size_stays_bounded():
    history = PowerHistory(bucket=60, window=600)
    for t in range(0, 6000, 60):
        history.sample([("A", 100.0)], at=float(t))
    assert len(history.series("A")[1]) == 10
    history.sample([("A", 7.0)], at=60_000.0)  # a day later
    history.sample([("A", 8.0)], at=60_060.0)
    start, values = history.series("A")
    assert start == 60_000.0 and values == (7, 8)


def test_damaged_records_are_ignored(tmp_path, caplog):
    history = PowerHistory()
    history.load({RECORD + "A": {"end": "x"}, RECORD + "B": {"end": 5, "w": [1, "2"]}})
    assert history.series("A") == history.series("B") == (0.0, ())
    assert "damaged" in caplog.text


async def test_the_history_survives_a_restart(make_rig, settings):
    settings = replace(settings, metrics_host="127.0.0.1", metrics_port=free_port())
    rig = await make_rig(settings)
    rig.bridge.history.interval = 0.05  # samples come fast; minutes are what is kept
    serial = virtual_serial(1)
    station = await rig.station(1)
    client = await rig.client()
    await client.write_register(REGISTER_MAP.address(1, "set_current"), 1600, device_id=1)
    await station.wait_for(lambda s: s.contactor)
    await eventually(lambda: any(v and v > 1000 for v in rig.bridge.history.series(serial)[1]))
    # Remembered (LP in the state file): the history of a station not known at start is dropped.
    await eventually(lambda: serial in rig.bridge.registry.store.lp_assignments())
    before = rig.bridge.history.series(serial)
    await rig.close()  # the open minute is sealed and written at shutdown
    with Store(settings.state_db) as store:
        record = store.records(RECORD)[RECORD + serial]
    assert record["w"][-1] == before[1][-1] > 1000

    again = await make_rig(settings)
    start, values = again.bridge.history.series(serial)
    assert start == before[0] and values[: len(before[1])] == before[1]
    # What the page reads: /api/history (apart from /api/status, which it fetches every 3 s).
    url = f"http://127.0.0.1:{again.bridge.metrics_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/history") as response:
            page = await response.json()
        async with session.get(f"{url}/api/status") as response:
            assert "history" not in (await response.json())["charge_points"][0]
    [shown] = page["charge_points"]
    assert page["step_s"] == 60 and shown["lp"] == 1 and shown["serial_number"]
    assert shown["start"] == before[0] and shown["w"][: len(before[1])] == list(before[1])
    assert time.time() - 600 < start <= time.time()  # wall-clock minutes, as the chart draws
