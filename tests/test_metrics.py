"""Metrics end to end: a real bridge, real scrapes over HTTP, promtool and a real Prometheus."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    RawStation,
    eventually,
    free_port,
    idle_data,
    public_id_of,
    require_tool,
    seed_public_key,
    station_config,
)
from prometheus_client.parser import text_string_to_metric_families

from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

ADDR = REGISTER_MAP.address
P = "openwb_modbus_evse_"
FAST_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)
SERIAL = virtual_serial(1)
SHORT = public_id_of(SERIAL)  # what the serial label shows: anyone on the LAN may scrape
LP1 = {"lp": "1", "serial": SHORT, "name": "LP1"}
# Values that are also registers: without fresh data they follow the register rule.
SERVED_AS_REGISTERS = (
    "current_amperes",
    "phase_power_watts",
    "power_watts",
    "plugged",
    "charging",
    "offered_current_amperes",
)
# Series that only exist while a station's data is fresh (the registers serve voltages as -1).
MEASUREMENTS = (
    "voltage_volts",
    "pwm_duty_cycle_ratio",
    "contactor_closed",
    "pilot_state",
    "cable_max_current_amperes",
    "wifi_rssi_dbm",
    "station_uptime_seconds",
)


class Scrape:
    """One exposition, parsed into samples."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def series(self, metric: str, /, **labels: str) -> list:
        """Samples named ``metric`` whose labels include ``labels``."""
        return [
            s
            for s in self.samples
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, metric: str, /, default: float | None = None, **labels: str) -> float:
        """The one sample matching; ``default`` if there is none (an error without one)."""
        found = self.series(metric, **labels)
        if not found and default is not None:
            return default
        assert len(found) == 1, f"{metric} {labels}: {found}"
        return found[0].value


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        return response.read()


async def scrape(rig) -> Scrape:
    """GET /metrics from the bridge (in a thread: the event loop keeps serving meanwhile)."""
    body = await asyncio.to_thread(_get, f"http://127.0.0.1:{rig.bridge.metrics_port}/metrics")
    return Scrape(body.decode())


@pytest.fixture(autouse=True)
def public_key(settings):
    seed_public_key(settings.state_db)


@pytest.fixture
async def rig(make_rig, settings):
    """A bridge with /metrics on a free loopback port."""
    return await make_rig(settings, metrics_host="127.0.0.1", metrics_port=free_port())


async def start_charging(rig, amps: int = 16):
    """LP1 charging at ``amps`` with a virtual vehicle; returns the station and the client."""
    client = await rig.client()
    station = await rig.station(1, FAST_VEHICLE)
    await station.wait_for(lambda s: s.plugged)
    rr = await client.write_register(ADDR(1, "set_current"), amps * 100, device_id=1)
    assert not rr.isError(), rr
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    point = rig.point(station.serial)
    # ... and the bridge has seen it too
    await eventually(lambda: charging_data(point) is not None)
    return station, client


def charging_data(point) -> p.StationData | None:
    data = point.state.data
    return data if data is not None and data.contactor and all(data.currents_ma) else None


# --- exposition format ---------------------------------------------------------------------


async def test_exposition_passes_promtool(rig):
    promtool = require_tool("promtool")
    await start_charging(rig)
    # make every kind of series appear: a Modbus exception and a protocol error as well
    client = await rig.client()
    rr = await client.write_register(ADDR(1, "set_current"), 500, device_id=1)
    assert rr.isError()
    raw = await RawStation.connect(rig.bridge.link.port, serial="AB" * 16)
    await raw.next_request()
    raw.send(b"\xee\x00\x00\x00\x00")
    assert await raw.closed_by_peer()
    await raw.close()

    metrics = await scrape(rig)
    families = {f.name for f in text_string_to_metric_families(metrics.text)}
    for name in (
        "voltage_volts",
        "energy_imported_joules",
        "pilot_state",
        "modbus_requests",
        "modbus_exceptions",
        "protocol_errors",
        "station_command_duration_seconds",
        "heartbeat_lapses",
    ):
        assert P + name in families
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=metrics.text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


async def test_promtool_is_really_checking():
    """The check above is worth something: promtool rejects what breaks the conventions."""
    promtool = require_tool("promtool")
    bad = "# HELP x_milliseconds x\n# TYPE x_milliseconds counter\nx_milliseconds 1\n"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "_total" in result.stdout + result.stderr


# --- charge-point values -------------------------------------------------------------------


async def test_charge_point_values_match_the_live_state(rig):
    station, client = await start_charging(rig, amps=16)
    point = rig.point(station.serial)
    data = point.state.data
    assert data is not None

    energy_before = point.energy.wh * 3600
    first = await scrape(rig)
    energy_after = point.energy.wh * 3600

    for phase in range(3):
        labels = {**LP1, "phase": str(phase + 1)}
        assert first.value(P + "voltage_volts", **labels) == 230.0
        assert first.value(P + "current_amperes", **labels) == data.currents_ma[phase] / 1000
        assert first.value(P + "current_amperes", **labels) == pytest.approx(15.6)
        assert first.value(P + "phase_power_watts", **labels) == pytest.approx(230 * 15.6)
    assert first.value(P + "power_watts", **LP1) == pytest.approx(data.power_w)
    assert first.value(P + "power_watts", **LP1) == pytest.approx(3 * 230 * 15.6)
    energy_1 = first.value(P + "energy_imported_joules_total", **LP1)
    assert 0 < energy_before <= energy_1 <= energy_after  # read at scrape time, in joules
    assert first.value(P + "plugged", **LP1) == 1
    assert first.value(P + "charging", **LP1) == 1
    assert first.value(P + "requested_current_amperes", **LP1) == 16
    assert first.value(P + "allowed_current_amperes", **LP1) == 16
    assert first.value(P + "offered_current_amperes", **LP1) == pytest.approx(15.6)  # PWM 26 %
    assert first.value(P + "pwm_duty_cycle_ratio", **LP1) == pytest.approx(0.26)
    assert first.value(P + "contactor_closed", **LP1) == 1
    pilot = {s.labels["state"]: s.value for s in first.series(P + "pilot_state", **LP1)}
    assert pilot.pop("C") == 1
    assert set(pilot) >= {"A", "B", "D", "E", "F"}
    assert all(v == 0 for v in pilot.values())
    assert first.value(P + "cable_max_current_amperes", **LP1) == 32
    assert first.value(P + "wifi_rssi_dbm", **LP1) == data.rssi_dbm < 0
    assert 0 < first.value(P + "station_uptime_seconds", **LP1) < 30
    assert first.value(P + "connected", **LP1) == 1
    age = first.value(P + "data_age_seconds", **LP1)
    assert 0 <= age <= 2 * rig.bridge.settings.poll_interval
    assert first.value(P + "station_sessions") == 1

    # the energy counter goes up while charging, at about the power
    await asyncio.sleep(1.5)
    second = await scrape(rig)
    energy_2 = second.value(P + "energy_imported_joules_total", **LP1)
    assert energy_2 > energy_1
    assert 0.4 * 10764 * 1.5 < energy_2 - energy_1 < 1.7 * 10764 * 1.5
    assert second.value(P + "station_uptime_seconds", **LP1) > first.value(
        P + "station_uptime_seconds", **LP1
    )

    # a controller's write shows in the very next scrape: nothing is cached
    rr = await client.write_register(ADDR(1, "set_current"), 1000, device_id=1)
    assert not rr.isError()
    third = await scrape(rig)
    assert third.value(P + "requested_current_amperes", **LP1) == 10


async def test_disconnected_station_shows_connected_0_no_stale_values_and_the_register_rule(rig):
    station = await rig.station(1, FAST_VEHICLE)
    point = rig.point(station.serial)
    await eventually(lambda: point.state.data is not None and point.state.data.pilot.plugged)
    before = await scrape(rig)
    for name in MEASUREMENTS + SERVED_AS_REGISTERS:
        assert before.series(P + name, serial=SHORT), name  # present while connected
    assert before.value(P + "plugged", **LP1) == 1
    # a station that has earned its LP (one that has not is forgotten when it leaves)
    await eventually(lambda: SERIAL in rig.bridge.registry.store.lp_assignments())

    await station.stop()
    await eventually(lambda: SERIAL not in rig.bridge.link.sessions)
    await eventually(lambda: not point.state.connected)
    after = await scrape(rig)
    assert after.value(P + "connected", **LP1) == 0
    for name in MEASUREMENTS:
        assert after.series(P + name, serial=SHORT) == [], name
    # the same as the registers: nothing to add up, plugged kept through a short outage
    client = await rig.client()
    rr = await client.read_input_registers(ADDR(1, "power"), count=100, device_id=1)
    registers = REGISTER_MAP.decode(rr.registers)
    assert after.value(P + "plugged", **LP1) == registers["plugged"] == 1
    assert after.value(P + "charging", **LP1) == registers["charging"] == 0
    assert after.value(P + "offered_current_amperes", **LP1) == registers["offered_current"] == 0
    assert after.value(P + "power_watts", **LP1) == registers["power"] == 0
    for phase in ("1", "2", "3"):
        assert after.value(P + "current_amperes", phase=phase, **LP1) == 0
        assert after.value(P + "phase_power_watts", phase=phase, **LP1) == 0
    assert registers["voltage_l1"] is None
    # what is still known stays: the counter, the request, how old the last data is
    assert after.value(P + "energy_imported_joules_total", **LP1) >= 0
    assert after.value(P + "requested_current_amperes", **LP1) == 0
    assert after.value(P + "data_age_seconds", **LP1) >= 0
    assert after.value(P + "station_sessions") == 0
    closed = P + "station_connections_closed_total"
    assert after.value(closed) == before.value(closed) + 1
    assert after.value(P + "station_sessions_opened_total") == 1


async def test_idle_station_from_raw_frames(rig):
    """What a hand-made station reports shows as sent, uptime read past its int32 wrap.

    Plugged (B) with the contactor closed: the contactor shows, but that is not charging.
    """
    serial = "CD" * 16
    raw = await RawStation.connect(rig.bridge.link.port, serial=serial)
    await raw.next_request()
    data = idle_data(
        pilot=p.Pilot.B_9V,
        contactor=True,
        voltages_mv=(229_100, 231_500, 227_000),
        currents_ma=(100, 200, 300),  # standby consumption
        uptime_ms=-(2**31) + 5000,
        rssi_dbm=-71,
        proximity=p.Proximity.CABLE_20A,
    )
    raw.send(p.encode_data(data, 4))
    await eventually(lambda: serial in rig.bridge.link.sessions)
    metrics = await scrape(rig)
    await raw.close()

    labels = {"serial": public_id_of(serial), "lp": "1", "name": "LP1"}
    for i, phase in enumerate("123"):
        v, a = data.voltages_mv[i] / 1000, data.currents_ma[i] / 1000
        assert metrics.value(P + "voltage_volts", phase=phase, **labels) == v
        assert metrics.value(P + "current_amperes", phase=phase, **labels) == a
        assert metrics.value(P + "phase_power_watts", phase=phase, **labels) == pytest.approx(v * a)
    assert metrics.value(P + "power_watts", **labels) == pytest.approx(data.power_w)
    assert data.power_w == pytest.approx(229.1 * 0.1 + 231.5 * 0.2 + 227 * 0.3)
    assert metrics.value(P + "station_uptime_seconds", **labels) == (2**31 + 5000) / 1000
    assert metrics.value(P + "wifi_rssi_dbm", **labels) == -71
    assert metrics.value(P + "cable_max_current_amperes", **labels) == 20
    pilot = {s.labels["state"]: s.value for s in metrics.series(P + "pilot_state", **labels)}
    assert pilot.pop("B") == 1 and set(pilot.values()) == {0}
    assert metrics.value(P + "plugged", **labels) == 1
    assert metrics.value(P + "charging", **labels) == 0
    assert metrics.value(P + "contactor_closed", **labels) == 1
    assert metrics.value(P + "offered_current_amperes", **labels) == 0
    assert metrics.value(P + "pwm_duty_cycle_ratio", **labels) == 1
    assert metrics.value(P + "connected", **labels) == 1


# --- service counters ----------------------------------------------------------------------


async def test_modbus_requests_and_exceptions_are_counted(rig):
    await rig.station(1, FAST_VEHICLE)
    client = await rig.client()
    before = await scrape(rig)

    rr = await client.read_input_registers(ADDR(1, "power"), count=10, device_id=1)
    assert not rr.isError(), rr
    rr = await client.write_register(ADDR(1, "set_current"), 500, device_id=1)
    assert rr.isError() and rr.exception_code == 3
    after = await scrape(rig)

    def delta(metric: str, **labels: str) -> float:
        return after.value(metric, 0.0, **labels) - before.value(metric, 0.0, **labels)

    requests = P + "modbus_requests_total"
    assert delta(requests, function_code="4", result="ok") == 1
    assert delta(requests, function_code="6", result="exception") == 1
    assert delta(requests, function_code="6", result="ok") == 0
    assert delta(P + "modbus_exceptions_total", code="3") == 1
    assert after.value(P + "requested_current_amperes", **LP1) == 0  # the bad write changed nothing


async def test_protocol_errors_are_counted_by_reason(rig):
    port = rig.bridge.link.port
    garbage = {
        "unknown_frame_type": b"\xee\x00\x00\x00\x00",
        "oversize": bytes([p.ResponseType.DATA]) + b"\xff\xff\xff\xff",
    }
    for index, frame in enumerate(garbage.values()):
        raw = await RawStation.connect(port, serial=f"{index:032X}")
        await raw.next_request()  # the bridge asks for data ...
        raw.send(frame)  # ... and gets garbage
        assert await raw.closed_by_peer()
        await raw.close()

    metrics = await scrape(rig)
    for reason in garbage:
        assert metrics.value(P + "protocol_errors_total", reason=reason) == 1
    assert sum(s.value for s in metrics.series(P + "protocol_errors_total")) == 2
    assert metrics.value(P + "station_sessions") == 0
    assert metrics.value(P + "station_sessions_opened_total") == 0
    assert metrics.value(P + "station_connections_closed_total") == 2
    assert metrics.series(P + "connected") == []  # garbage claims no charge point


async def test_command_round_trip_histogram(rig):
    await start_charging(rig)
    first = await scrape(rig)
    name = P + "station_command_duration_seconds"
    for command in ("data", "pwm_ack", "contactor_ack"):
        count = first.value(name + "_count", command=command)
        assert count >= 1, command
        buckets = sorted(
            (float(s.labels["le"]), s.value)
            for s in first.series(name + "_bucket", command=command)
        )
        assert buckets[-1] == (math.inf, count)
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        assert 0 < first.value(name + "_sum", command=command) < count * 0.5  # loopback
    await asyncio.sleep(2 * rig.bridge.settings.poll_interval + 0.1)
    second = await scrape(rig)
    assert second.value(name + "_count", command="data") > first.value(
        name + "_count", command="data"
    )


async def test_heartbeat_age_and_lapses(make_rig, settings):
    """A configured station that never connected: its LP is served, heartbeat rules apply."""
    rig = await make_rig(
        settings,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        heartbeat_timeout=0.6,
        station=(station_config(1, lp=1),),
    )
    heartbeat = rig.bridge.modbus_heartbeat
    client = await rig.client()
    rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
    assert not rr.isError(), rr
    start = await scrape(rig)
    assert start.value(P + "heartbeat_lapsed") == 0
    assert start.value(P + "heartbeat_lapses_total") == 0
    assert 0 <= start.value(P + "heartbeat_age_seconds") < 0.6
    assert start.value(P + "allowed_current_amperes", **LP1) == 16
    assert start.value(P + "connected", **LP1) == 0
    for name in MEASUREMENTS:
        assert start.series(P + name, serial=SHORT) == [], name  # never any data
    assert start.series(P + "data_age_seconds", serial=SHORT) == []

    await eventually(lambda: heartbeat.lapsed, timeout=3)
    age_before = heartbeat.age()
    lapsed = await scrape(rig)
    age_after = heartbeat.age()
    assert lapsed.value(P + "heartbeat_lapsed") == 1
    assert lapsed.value(P + "heartbeat_lapses_total") == 1
    assert lapsed.value(P + "heartbeat_recoveries_total") == 0
    assert 0.6 <= age_before <= lapsed.value(P + "heartbeat_age_seconds") <= age_after
    assert lapsed.value(P + "requested_current_amperes", **LP1) == 16  # kept ...
    assert lapsed.value(P + "allowed_current_amperes", **LP1) == 0  # ... but not allowed

    await client.read_input_registers(ADDR(1, "power"), count=1, device_id=1)
    back = await scrape(rig)
    assert back.value(P + "heartbeat_lapsed") == 0
    assert back.value(P + "heartbeat_lapses_total") == 1
    assert back.value(P + "heartbeat_recoveries_total") == 1
    assert back.value(P + "heartbeat_age_seconds") < 0.6
    assert back.value(P + "allowed_current_amperes", **LP1) == 16


async def test_metrics_port_0_serves_nothing(make_rig, settings):
    rig = await make_rig(settings, metrics_port=0)
    assert rig.bridge.metrics_port == 0
    assert rig.bridge.web is None


# --- a real Prometheus ---------------------------------------------------------------------


def _prometheus_config(path: Path, target_port: int) -> None:
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: openwb\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )


async def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = json.loads(await asyncio.to_thread(_get, url))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow
async def test_real_prometheus_scrapes_the_live_power(rig, tmp_path):
    prometheus = require_tool("prometheus")
    config = tmp_path / "prometheus.yml"
    _prometheus_config(config, rig.bridge.metrics_port)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    try:
        station, _ = await start_charging(rig)  # while Prometheus starts up
        point = rig.point(station.serial)

        async def ready() -> bool:
            assert proc.returncode is None, log_tail()
            try:
                await asyncio.to_thread(_get, f"{base}/-/ready", 1.0)
            except OSError:
                return False
            return True

        async with asyncio.timeout(20):
            while not await ready():
                await asyncio.sleep(0.1)

        # Prometheus sends new targets to its scrapers every 5 s: the first scrape takes a while.
        promql = 'openwb_modbus_evse_power_watts{job="openwb",lp="1"}'
        result: list[dict] = []
        try:
            async with asyncio.timeout(25):
                while not result:
                    await asyncio.sleep(0.25)
                    result = await _query(base, promql)
        except TimeoutError:
            pytest.fail(f"Prometheus never had {promql}\n{log_tail()}")

        assert len(result) == 1
        assert result[0]["metric"]["serial"] == SHORT
        assert result[0]["metric"]["name"] == "LP1"
        data = charging_data(point)
        assert data is not None
        assert float(result[0]["value"][1]) == pytest.approx(data.power_w)
        assert float(result[0]["value"][1]) == pytest.approx(3 * 230 * 15.6)
        voltage = await _query(base, 'openwb_modbus_evse_voltage_volts{lp="1",phase="2"}')
        assert float(voltage[0]["value"][1]) == data.voltages_mv[1] / 1000 == 230.0
        up = await _query(base, 'up{job="openwb"}')
        assert float(up[0]["value"][1]) == 1
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()


def test_the_metrics_page_lists_every_metric():
    """docs/metrics.md names every family the service exposes."""
    import openwb_modbus_evse

    readme = (
        Path(openwb_modbus_evse.__file__).resolve().parents[1] / "docs" / "metrics.md"
    ).read_text()

    from openwb_modbus_evse.config import Settings, StationConfig
    from openwb_modbus_evse.service import Service

    async def families() -> set[str]:
        # MQTT on (a broker that is not there): its metrics exist while it retries.
        bridge = Service(
            Settings(
                evse_host="127.0.0.1",
                evse_port=0,
                modbus_port=0,
                metrics_port=0,
                state_db=":memory:",
                mqtt_host="127.0.0.1",
                mqtt_port=free_port(),
                # OCPP on (a central system that is not there): its metrics exist meanwhile.
                ocpp_url=f"ws://127.0.0.1:{free_port()}/ocpp",
                station=(StationConfig(serial="AB" * 16, lp=1),),
            )
        )
        await bridge.start()
        try:
            text = bridge.metrics.exposition(bridge.snapshot()).decode()
        finally:
            await bridge.stop()
        return {f.name for f in text_string_to_metric_families(text)}

    names = asyncio.run(families())
    assert len(names) > 25
    for name in names:
        short = name.removeprefix(P)
        assert f"`{short}" in readme or f"`{short}_total" in readme, name
