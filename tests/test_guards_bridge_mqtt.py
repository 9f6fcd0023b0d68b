"""Guards for the Rust-bridge MQTT messages (controller "bridge-mqtt"): whose heartbeat it is,
what refreshes it, requests during shutdown, and the station limit at every step.

A real mosquitto, the service in-process, virtual stations. Each test names the mutation it
kills. The heartbeat's age is read from its Prometheus metric, as an operator would.
"""

from __future__ import annotations

import asyncio
import json

import aiomqtt
import pytest
import test_rust_bridge
from conftest import Broker, eventually, station_config
from conftest import metric as scraped
from test_guards_registry import KeepAlive
from test_rust_bridge import PUBLISH, SUBSCRIBE, commands, readme_request, running
from test_supply_service import Watch

from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

VEHICLE = VehicleConfig(plug_in_after=None, reaction_s=0.05, max_current_a=32)
MODBUS_STATION = virtual_serial(2)
METRIC = "openwb_modbus_evse_heartbeat"
client = test_rust_bridge.client  # the subscriber fixture, shared


@pytest.fixture
def mqtt_settings(settings, broker):
    """LP1 driven over bridge-mqtt, LP2 over Modbus, LP3 over bridge-mqtt (never connected)."""
    return broker.settings(
        settings,
        bridge_topics=f"{PUBLISH},{SUBSCRIBE}",
        station=(
            station_config(1, 1, controller="bridge-mqtt"),
            station_config(2, 2),
            station_config(3, 3, controller="bridge-mqtt"),
        ),
    )


def metric(rig, name: str) -> float | None:
    """The bridge-mqtt heartbeat's sample ``name`` as a scrape shows it."""
    return scraped(rig.bridge, name, controller="bridge-mqtt", scope="")


def heartbeat_age(rig) -> float:
    return metric(rig, f"{METRIC}_age_seconds")


async def bridge_charging(rig, client, pwm: int = 26):
    station = await rig.station(1, VEHICLE)
    station.plug_in()
    await client.ask(
        readme_request("request_set_pwm_percent", pwm_percent=pwm), "response_set_pwm_percent"
    )
    await client.ask(
        readme_request("request_set_contactor_state", contactor_state=True),
        "response_set_contactor_state",
    )
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    return station


# --- 5. the heartbeat applies to bridge-mqtt stations only -------------------------------------


async def test_the_bridge_heartbeat_neither_stops_nor_revives_a_modbus_station(
    mqtt_settings, make_rig, client
):
    """LP2 is driven over Modbus. (a) No bridge request for its timeout: the bridge heartbeat
    lapses, LP2 goes on charging. (b) The Modbus controller goes quiet, LP2 stops; then a bridge
    request comes: LP2 stays stopped.

    kills: ``RustBridgeApi._heartbeat_changed`` applying to every charge point (for the lapse
    or for the recovery)."""
    rig = await running(
        make_rig, mqtt_settings, heartbeat_timeout=1.5, bridge_heartbeat_timeout=1.0
    )
    modbus = await rig.client()
    alive = KeepAlive(modbus)
    two = await rig.station(2, VehicleConfig(plug_in_after=0.0, reaction_s=0.05))
    rr = await modbus.write_register(REGISTER_MAP.address(2, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    await two.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=5)
    since = len(two.received)
    # (a)
    await eventually(lambda: metric(rig, f"{METRIC}_lapsed") == 1, timeout=5)
    await asyncio.sleep(1.0)
    assert ("pwm", 100) not in commands(two, since) and two.pwm == 26
    # (b)
    alive.stop()
    await two.wait_for(lambda s: s.pwm == 100, timeout=5)
    await client.ask(readme_request("request_ping", MODBUS_STATION), "response_ping")
    await eventually(lambda: metric(rig, f"{METRIC}_lapsed") == 0)
    await asyncio.sleep(1.0)
    assert two.pwm == 100


# --- 5. no commands once the shutdown has begun ------------------------------------------------


async def test_set_requests_during_shutdown_are_refused(mqtt_settings, make_rig, client):
    """The shutdown has sent PWM 100 % and waits for the vehicle (1.5 s): a request for 26 %
    and one allowing the contactor are answered with an error, and nothing more than PWM 100 %
    reaches the station.

    kills: ``RustBridgeApi._carry_out`` ignoring ``_closing``."""
    rig = await running(make_rig, mqtt_settings, stop_timeout=3.0)
    slow = VehicleConfig(plug_in_after=None, reaction_s=1.5, max_current_a=32)
    station = await rig.station(1, slow)
    station.plug_in()
    await client.send(readme_request("request_set_pwm_percent", pwm_percent=26))
    await client.send(readme_request("request_set_contactor_state", contactor_state=True))
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=8)
    stopping = asyncio.create_task(rig.bridge.stop())
    await station.wait_for(lambda s: s.pwm == 100, timeout=3)
    since = len(station.received)
    for request, answer in (
        (readme_request("request_set_pwm_percent", pwm_percent=26), "response_set_pwm_percent"),
        (
            readme_request("request_set_contactor_state", contactor_state=True),
            "response_set_contactor_state",
        ),
    ):
        reply = json.loads(await client.ask(request, answer))
        assert reply["message_type"] == "error" and reply["reason"] == "offline", reply
    await stopping
    assert [c for c in commands(station, since) if c[0] == "pwm" and c[1] != 100] == []
    assert station.pwm == 100 and not station.contactor


# --- 8. refused, malformed and retained requests do not refresh the heartbeat ------------------

REFUSED = [
    (b"{not json", "malformed_json"),
    (readme_request("request_ping", 42), "wrong_field_type"),
    (readme_request("request_reboot"), "unknown_message_type"),
    (readme_request("request_ping", "00112233445566778899AABBCCDDEEFF"), "unknown_client_id"),
    (readme_request("request_set_pwm_percent", pwm_percent=5), "bad_value"),
    (readme_request("request_set_pwm_percent", MODBUS_STATION, pwm_percent=26), "not_controller"),
    (readme_request("request_ping", virtual_serial(3)), "offline"),
]


async def test_no_refused_request_refreshes_the_heartbeat(mqtt_settings, make_rig, client):
    """Every kind of refusal, one at a time: the heartbeat's age only grows. A good request
    then resets it (so the age does show a refresh).

    kills: ``heartbeat.refresh()`` for every message, for refused ones (in the ``except``),
    or before the request is checked."""
    rig = await running(make_rig, mqtt_settings, bridge_heartbeat_timeout=60.0)
    await rig.station(1, VEHICLE)
    await asyncio.sleep(0.3)
    for payload, reason in REFUSED:
        before = heartbeat_age(rig)
        reply = json.loads(await client.ask(payload, "error"))
        assert reply["reason"] == reason, reply
        assert heartbeat_age(rig) >= before, reason
    before = heartbeat_age(rig)
    await client.ask(readme_request("request_ping"), "response_ping")
    assert heartbeat_age(rig) < before


async def test_a_controller_that_sends_only_bad_requests_lets_charging_stop(
    mqtt_settings, make_rig, client
):
    """Charging at 15.6 A; then for 3 s only refused requests (every 0.2 s): the heartbeat
    lapses after 1.5 s and the station stops.

    kills: refused requests refreshing the heartbeat."""
    rig = await running(make_rig, mqtt_settings, bridge_heartbeat_timeout=1.5)
    station = await bridge_charging(rig, client)

    async def flood() -> None:
        for i in range(15):
            await client.send(REFUSED[i % len(REFUSED)][0])
            await asyncio.sleep(0.2)

    flooding = asyncio.create_task(flood())
    await station.wait_for(lambda s: s.pwm == 100, timeout=3.5)
    flooding.cancel()


async def test_a_retained_request_replayed_after_a_reconnect_does_not_refresh_the_heartbeat(
    settings, make_rig, tmp_path
):
    """A retained request waits on a broker that keeps it across restarts. The service refuses
    it when it connects, and again after the broker restarted (the replay comes with every new
    subscription): the heartbeat's age goes on growing through both.

    kills: a retained request refreshing the heartbeat before or while it is refused."""
    broker = Broker(tmp_path)
    broker.config.write_text(
        broker.config.read_text().replace(
            "persistence false", f"persistence true\npersistence_location {tmp_path}/"
        )
    )
    await broker.start()
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as other:
            request = readme_request("request_set_contactor_state", contactor_state=True)
            await other.publish(SUBSCRIBE, request, retain=True)
        rig = await running(
            make_rig,
            broker.settings(
                settings,
                bridge_topics=f"{PUBLISH},{SUBSCRIBE}",
                station=(station_config(1, 1, controller="bridge-mqtt"),),
            ),
        )
        refused = "openwb_modbus_evse_commands_refused_total"
        labels = {"interface": "bridge-mqtt", "reason": "replay"}
        await eventually(lambda: scraped(rig.bridge, refused, **labels) == 1)
        await asyncio.sleep(1.0)
        before = heartbeat_age(rig)
        await broker.restart()
        await eventually(lambda: scraped(rig.bridge, refused, **labels) == 2, timeout=10)
        assert heartbeat_age(rig) >= before
        await rig.close()
    finally:
        broker.stop()


# --- 10. the station limit holds at every step, not only at the end ---------------------------


async def test_the_station_limit_holds_at_every_step(mqtt_settings, make_rig, client):
    """Station limit 16 A; the controller asks 85 % (51 A), 50 %, 85 % again, allowing the
    contactor in between. Every PWM the station is sent, every PWM it shows (sampled every
    2 ms) and every PWM published stays within 16 A (26 %).

    kills: a request passed on to the station before the state machine caps it (the end state
    is 26 % all the same, which is all tests/test_rust_bridge.py checks), and a station limit
    applied only once the contactor is closed."""
    stations = (station_config(1, 1, controller="bridge-mqtt", max_current=16),)
    rig = await running(make_rig, mqtt_settings, station=stations)
    station = await rig.station(1, VEHICLE)
    watch = Watch([station])
    station.plug_in()
    await client.ask(
        readme_request("request_set_pwm_percent", pwm_percent=85), "response_set_pwm_percent"
    )
    await station.wait_for(lambda s: s.pwm == 26)
    await client.ask(
        readme_request("request_set_contactor_state", contactor_state=True),
        "response_set_contactor_state",
    )
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    for pwm in (50, 85):
        await client.ask(
            readme_request("request_set_pwm_percent", pwm_percent=pwm), "response_set_pwm_percent"
        )
        await asyncio.sleep(0.6)
    watch.stop()
    assert station.pwm == 26 and station.contactor
    sent = [value for kind, value in commands(station) if kind == "pwm"]
    assert sent and all(value <= 26 or value == 100 for value in sent), sent
    assert watch.peak <= 15.6
    shown = [m["pwm_percent"] for m in client.of("response_collect_data")]
    assert shown and all(value <= 26 or value == 100 for value in shown), shown
