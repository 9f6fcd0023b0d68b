"""The Rust bridge's MQTT messages end to end: a real mosquitto, the service, virtual stations.

The test client speaks exactly the dehneevse-mqtt-bridge README's examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiomqtt
import pytest
from conftest import eventually, metric, station_config

from openwb_modbus_evse import config
from openwb_modbus_evse.evse.protocol import RequestType
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

PUBLISH, SUBSCRIBE = "from_dehneEVSE", "to_dehneEVSE"
SERIAL = virtual_serial(1)
VEHICLE = VehicleConfig(plug_in_after=None, reaction_s=0.05, max_current_a=32)
COLLECT_KEYS = ["message_type", "client_id", "pwm_percent", "contactor_state", "measurements"]
MEASUREMENT_TYPES = {
    "pilot_voltage": str,
    "proximity_pilot_amps": str,
    "phase1_millivolts": int,
    "phase2_millivolts": int,
    "phase3_millivolts": int,
    "phase1_milliamps": int,
    "phase2_milliamps": int,
    "phase3_milliamps": int,
    "wifi_rssi": int,
    "uptime_milliseconds": int,
    "current_control_pilot_adc": int,
    "current_proximity_pilot_adc": int,
    "logging_buffer": str,
}


def readme_request(message_type: str, client_id: str = SERIAL, **fields) -> str:
    """A request as the README prints it (pretty-printed JSON)."""
    return json.dumps({"message_type": message_type, "client_id": client_id, **fields}, indent=2)


class Client:
    """An MQTT client like a Node-RED flow: reads the publish topic, writes the subscribe topic."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.raw: list[bytes] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            self.raw.append(bytes(message.payload))

    @property
    def messages(self) -> list[dict]:
        return [json.loads(raw) for raw in self.raw]

    def of(self, message_type: str, since: int = 0) -> list[dict]:
        return [m for m in self.messages[since:] if m["message_type"] == message_type]

    async def send(self, payload: str | bytes, retain: bool = False) -> None:
        await self.client.publish(SUBSCRIBE, payload, retain=retain)

    async def ask(self, payload: str | bytes, answer: str, retain: bool = False) -> bytes:
        """Send one request; the first message of type ``answer`` (or an error) after it."""
        since = len(self.raw)
        await self.send(payload, retain)

        def found() -> bytes | None:
            for raw in self.raw[since:]:
                if json.loads(raw)["message_type"] in (answer, "error"):
                    return raw
            return None

        await eventually(lambda: found() is not None, timeout=3)
        return found()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
def mqtt_settings(settings, broker):
    return broker.settings(
        settings,
        bridge_topics=f"{PUBLISH},{SUBSCRIBE}",
        station=(station_config(1, 1, controller="bridge-mqtt"), station_config(2, 2)),
    )


@pytest.fixture
async def client(broker):
    async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
        await raw.subscribe(PUBLISH)
        client = Client(raw)
        yield client
        await client.close()


async def running(make_rig, settings, **changes):
    rig = await make_rig(settings, **changes)
    await eventually(lambda: rig.bridge.mqtt.connected)
    return rig


def assert_documented_collect_data(message: dict, serial: str = SERIAL) -> None:
    assert list(message) == COLLECT_KEYS
    assert message["client_id"] == serial
    assert type(message["pwm_percent"]) is int and type(message["contactor_state"]) is bool
    measurements = message["measurements"]
    assert list(measurements) == list(MEASUREMENT_TYPES)
    for key, kind in MEASUREMENT_TYPES.items():
        assert type(measurements[key]) is kind, key


# --- what subscribers receive ------------------------------------------------------------------


async def test_a_readme_client_gets_the_documented_messages(mqtt_settings, make_rig, client):
    rig = await running(make_rig, mqtt_settings)
    station = await rig.station(1, VEHICLE)
    # new_connection, byte for byte as the README shows it (compact, as serde_json prints it)
    await eventually(lambda: client.of("new_connection"))
    assert client.raw[0] == (
        b'{"message_type":"new_connection","client_id":"%s","handshake":{"firmware_version":4}}'
        % SERIAL.encode()
    )
    # response_collect_data after every poll, without asking
    await eventually(lambda: len(client.of("response_collect_data")) >= 3, timeout=3)
    first = client.of("response_collect_data")[0]
    assert_documented_collect_data(first)
    assert first["measurements"]["pilot_voltage"] == "volt_12"
    assert first["measurements"]["proximity_pilot_amps"] == "amp_32"
    assert first["pwm_percent"] == 100 and first["contactor_state"] is False
    polls = sum(r.type is RequestType.COLLECT_DATA for r in station.received)
    assert polls - len(client.of("response_collect_data")) in (0, 1)  # one may be in flight
    # notify when the station notifies, then the data that shows why
    since = len(client.raw)
    station.plug_in()
    await eventually(lambda: client.of("notify", since))
    assert b'{"message_type":"notify","client_id":"%s"}' % SERIAL.encode() in client.raw[since:]
    await eventually(
        lambda: any(
            m["measurements"]["pilot_voltage"] == "volt_9"
            for m in client.of("response_collect_data", since)
        )
    )
    # the station's log comes with the poll that brought it
    logs = "".join(m["measurements"]["logging_buffer"] for m in client.of("response_collect_data"))
    assert "pilot 12V->9V\0" in logs
    # request_ping, answered for the live session
    answer = await client.ask(readme_request("request_ping"), "response_ping")
    assert answer == b'{"message_type":"response_ping","client_id":"%s"}' % SERIAL.encode()


async def test_data_collection_is_answered_from_the_live_session(mqtt_settings, make_rig, client):
    rig = await running(make_rig, mqtt_settings, poll_interval=9.0)
    station = await rig.station(1, VEHICLE)
    await eventually(lambda: client.of("response_collect_data"))
    polls = len(station.received)
    started = asyncio.get_running_loop().time()
    raw = await client.ask(readme_request("request_data_collection"), "response_collect_data")
    assert asyncio.get_running_loop().time() - started < 1.0  # no poll was due for 9 s
    answer = json.loads(raw)
    assert_documented_collect_data(answer)
    assert answer["measurements"]["logging_buffer"] == ""  # the log went out with its poll
    assert answer["measurements"]["phase1_millivolts"] == 230_000
    assert len(station.received) == polls  # no second poller: the station was not asked


# --- control through the state machine ---------------------------------------------------------


def commands(station, since: int = 0) -> list[tuple[str, object]]:
    """The PWM and contactor commands the station received, in order."""
    out = []
    for request in station.received[since:]:
        if request.type is RequestType.SET_PWM:
            out.append(("pwm", request.pwm))
        elif request.type is RequestType.SET_CONTACTOR:
            out.append(("contactor", request.contactor))
    return out


async def test_set_requests_drive_the_station_only_through_the_safe_sequence(
    mqtt_settings, make_rig, client
):
    rig = await running(make_rig, mqtt_settings)
    station = await rig.station(1, VEHICLE)
    station.plug_in()
    # pwm 50 % is a current request of 30 A: offered, but the contactor waits for permission
    answer = await client.ask(
        readme_request("request_set_pwm_percent", pwm_percent=50), "response_set_pwm_percent"
    )
    assert answer == b'{"message_type":"response_set_pwm_percent","client_id":"%s"}' % (
        SERIAL.encode()
    )
    await station.wait_for(lambda s: s.pwm == 50 and s.pilot.requests_power)
    await asyncio.sleep(1.0)  # two polls: the vehicle asks, nothing closes
    assert not station.contactor
    assert rig.point(SERIAL).state.requested_ca == 3000
    # contactor true allows it: the service closes it, the vehicle draws
    answer = await client.ask(
        readme_request("request_set_contactor_state", contactor_state=True),
        "response_set_contactor_state",
    )
    assert json.loads(answer) == {
        "message_type": "response_set_contactor_state",
        "client_id": SERIAL,
    }
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    # contactor false while charging: PWM 100 % first, the contactor opens after that
    since = len(station.received)
    await client.ask(
        readme_request("request_set_contactor_state", contactor_state=False),
        "response_set_contactor_state",
    )
    await station.wait_for(lambda s: not s.contactor)
    sent = commands(station, since)
    assert sent.index(("pwm", 100)) < sent.index(("contactor", False))
    # then the current is offered again, the contactor stays open, as in the Rust bridge
    await station.wait_for(lambda s: s.pwm == 50)
    await asyncio.sleep(1.0)
    assert not station.contactor
    # pwm 100 % is a stop: nothing offered
    await client.ask(
        readme_request("request_set_pwm_percent", pwm_percent=100), "response_set_pwm_percent"
    )
    await station.wait_for(lambda s: s.pwm == 100)
    assert rig.point(SERIAL).state.requested_ca == 0


async def test_the_current_never_exceeds_the_station_limit(mqtt_settings, make_rig, client):
    stations = (station_config(1, 1, controller="bridge-mqtt", max_current=16),)
    rig = await running(make_rig, mqtt_settings, station=stations)
    station = await rig.station(1, VEHICLE)
    station.plug_in()
    await client.ask(
        readme_request("request_set_pwm_percent", pwm_percent=85), "response_set_pwm_percent"
    )
    await station.wait_for(lambda s: s.pwm == 26)  # 16 A -> 26 % = 15.6 A, never more


async def test_a_subscriber_that_goes_quiet_stops_charging(mqtt_settings, make_rig, client):
    rig = await running(make_rig, mqtt_settings, bridge_heartbeat_timeout=1.5)
    station = await rig.station(1, VEHICLE)
    station.plug_in()
    await client.send(readme_request("request_set_pwm_percent", pwm_percent=26))
    await client.send(readme_request("request_set_contactor_state", contactor_state=True))
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma))
    since = len(station.received)
    await station.wait_for(lambda s: s.pwm == 100, timeout=4)  # no request for 1.5 s
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    sent = commands(station, since)
    assert sent.index(("pwm", 100)) < sent.index(("contactor", False))
    assert rig.bridge.bridge_mqtt.heartbeat.lapses == 1
    lapsed = "openwb_modbus_evse_heartbeat_lapsed"
    assert metric(rig.bridge, lapsed, controller="bridge-mqtt", scope="") == 1
    await client.ask(readme_request("request_ping"), "response_ping")  # any request: back
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=3)


# --- refused requests --------------------------------------------------------------------------


async def test_set_requests_for_a_station_of_another_controller_are_refused(
    mqtt_settings, make_rig, client
):
    rig = await running(make_rig, mqtt_settings)
    station = await rig.station(2, VEHICLE)  # LP2: controlled by Modbus
    station.plug_in()
    other = virtual_serial(2)
    for request in (
        readme_request("request_set_pwm_percent", other, pwm_percent=50),
        readme_request("request_set_contactor_state", other, contactor_state=True),
    ):
        error = json.loads(await client.ask(request, "response_set_pwm_percent"))
        assert error["message_type"] == "error" and error["reason"] == "not_controller"
        assert error["client_id"] == other
    await asyncio.sleep(0.6)
    assert rig.point(other).state.requested_ca == 0 and station.pwm == 100
    # reading works for every station
    assert b"response_ping" in await client.ask(
        readme_request("request_ping", other), "response_ping"
    )


BAD = [
    (b"{not json", "malformed_json", None, None),
    (b"", "malformed_json", None, None),
    (b'["request_ping"]', "malformed_json", None, None),
    (readme_request("request_ping", "00112233445566778899AABBCCDDEEFF"), "unknown_client_id", 1, 1),
    (readme_request("request_ping", "AB\nWARNING forged line"), "unknown_client_id", 1, 1),
    (readme_request("request_reboot"), "unknown_message_type", 1, 1),
    (readme_request("request_firmware"), "unknown_message_type", 1, 1),
    (readme_request("request_ping", 42), "wrong_field_type", None, 1),
    (readme_request("request_set_pwm_percent", pwm_percent="50"), "wrong_field_type", 1, 1),
    (readme_request("request_set_pwm_percent", pwm_percent=50.5), "wrong_field_type", 1, 1),
    (readme_request("request_set_pwm_percent"), "wrong_field_type", 1, 1),
    (readme_request("request_set_contactor_state", contactor_state="on"), "wrong_field_type", 1, 1),
    (readme_request("request_set_pwm_percent", pwm_percent=5), "bad_value", 1, 1),
    (readme_request("request_set_pwm_percent", pwm_percent=0), "bad_value", 1, 1),
    (readme_request("request_set_pwm_percent", pwm_percent=101), "bad_value", 1, 1),
]


async def test_every_bad_request_gets_one_error_and_changes_nothing(
    mqtt_settings, make_rig, client, caplog
):
    caplog.set_level(logging.WARNING)
    rig = await running(make_rig, mqtt_settings)
    station = await rig.station(1, VEHICLE)
    station.plug_in()
    await client.ask(
        readme_request("request_set_pwm_percent", pwm_percent=26), "response_set_pwm_percent"
    )
    await station.wait_for(lambda s: s.pwm == 26)
    state = rig.point(SERIAL).state
    for payload, reason, has_client, has_request in BAD:
        since = len(client.raw)
        error = json.loads(await client.ask(payload, "error"))
        assert error["message_type"] == "error", payload
        assert error["reason"] == reason, payload
        assert ("client_id" in error) == bool(has_client), payload
        assert ("request" in error) == bool(has_request), payload
        assert isinstance(error["error"], str) and error["error"]
        await asyncio.sleep(0.05)
        assert len(client.of("error", since)) == 1, payload  # one error, not more
    assert rig.point(SERIAL).state.requested_ca == state.requested_ca == 1560
    assert rig.point(SERIAL).state.contactor_allowed == state.contactor_allowed
    assert station.pwm == 26
    assert rig.bridge.mqtt.connected and rig.bridge.mqtt.connects == 1  # stayed up
    refused = [r for r in caplog.records if "bridge-mqtt: refused" in r.getMessage()]
    assert len(refused) == len(BAD)
    assert not any("\n" in r.getMessage() for r in refused)  # no forged log lines
    sample = rig.bridge.metrics.registry.get_sample_value
    name = "openwb_modbus_evse_commands_refused_total"
    assert sample(name, {"interface": "bridge-mqtt", "reason": "malformed_json"}) == 3
    assert (
        sample(name, {"interface": "bridge-mqtt", "reason": "wrong_field_type"}) == 5
    )  # still answering
    assert b"response_ping" in await client.ask(readme_request("request_ping"), "response_ping")


async def test_a_retained_request_is_not_carried_out(mqtt_settings, make_rig, broker, client):
    async with aiomqtt.Client("127.0.0.1", broker.port) as other:
        await other.publish(
            SUBSCRIBE,
            readme_request("request_set_contactor_state", contactor_state=True),
            retain=True,
        )
    rig = await running(make_rig, mqtt_settings)
    await eventually(lambda: client.of("error"))
    assert client.of("error")[0]["reason"] == "replay"
    assert not rig.point(SERIAL).state.contactor_allowed


async def test_log_lines_for_refused_requests_are_limited(mqtt_settings, make_rig, client, caplog):
    caplog.set_level(logging.WARNING)
    await running(make_rig, mqtt_settings)
    for _ in range(30):
        await client.send(b"{not json")
    await eventually(lambda: len(client.of("error")) == 30)
    refused = [r for r in caplog.records if "bridge-mqtt: refused" in r.getMessage()]
    assert 20 <= len(refused) <= 21  # a burst of 20, then one a second (per kind of refusal)


async def test_without_bridge_topics_nothing_is_published(mqtt_settings, make_rig, client):
    rig = await running(make_rig, mqtt_settings, bridge_topics="", station=())
    await rig.station(1, VEHICLE)
    await client.send(readme_request("request_ping"))
    await asyncio.sleep(1.0)
    assert client.raw == [] and rig.bridge.bridge_mqtt is None


# --- configuration -----------------------------------------------------------------------------


def test_bridge_topics_and_the_two_options(tmp_path):
    base = {"mqtt_host": "localhost"}
    assert config.build(base).bridge_topic_pair is None
    assert config.build({**base, "bridge_topics": "a/b,c"}).bridge_topic_pair == ("a/b", "c")
    path = tmp_path / "c.toml"
    path.write_text('mqtt_host = "localhost"\nbridge_topics = "out,in"\n')
    loaded = config.load(path, {"bridge_subscribe_topic": "cmd"})
    assert loaded.bridge_topic_pair == ("out", "cmd")
    loaded = config.load(None, {"mqtt_host": "h", "bridge_publish_topic": "evse/out"})
    assert loaded.bridge_topic_pair == ("evse/out", "to_dehneEVSE")  # the Rust bridge's default


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"mqtt_host": "h", "bridge_topics": "only-one"}, "bridge_topics"),
        ({"mqtt_host": "h", "bridge_topics": "a,b,c"}, "bridge_topics"),
        ({"mqtt_host": "h", "bridge_topics": "a,"}, "bridge_topics"),
        ({"mqtt_host": "h", "bridge_topics": "same,same"}, "bridge_topics"),
        ({"mqtt_host": "h", "bridge_topics": "out,in/#"}, "bridge_topics"),
        ({"mqtt_host": "h", "bridge_topics": 5}, "bridge_topics"),
        ({"bridge_topics": "out,in"}, "bridge_topics"),  # no broker
        ({"controller": "bridge-mqtt"}, "controller"),  # no bridge_topics
        ({"controller": "http"}, "controller"),
        (
            {"station": [{"serial": SERIAL, "lp": 1, "controller": "bridge-mqtt"}]},
            "station[0].controller",
        ),
    ],
)
def test_bad_bridge_settings_name_the_key(values, key):
    with pytest.raises(config.ConfigError) as err:
        config.build(values)
    assert err.value.key == key


def test_serve_takes_the_two_topic_options():
    from click.testing import CliRunner

    from openwb_modbus_evse.cli import main

    runner = CliRunner()
    ok = runner.invoke(
        main, ["serve", "--mqtt-host", "h", "--bridge-publish-topic", "evse/out", "--check-config"]
    )
    assert ok.exit_code == 0, ok.output
    same = ["--bridge-publish-topic", "x", "--bridge-subscribe-topic", "x"]
    refused = runner.invoke(main, ["serve", "--mqtt-host", "h", *same, "--check-config"])
    assert refused.exit_code == 2
    assert "config error: bridge_topics: publish and subscribe topics must differ" in (
        refused.output
    )


async def test_modbus_cannot_write_to_a_bridge_mqtt_station(mqtt_settings, make_rig):
    from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP

    rig = await running(make_rig, mqtt_settings)
    station = await rig.station(1, VEHICLE)
    station.plug_in()
    client = await rig.client()
    reply = await client.write_register(REGISTER_MAP.address(1, "set_current"), 1600, device_id=1)
    assert reply.isError() and reply.exception_code == 1
    await asyncio.sleep(0.6)
    assert rig.point(SERIAL).state.requested_ca == 0 and station.pwm == 100
