"""Home Assistant MQTT discovery and the "homeassistant" controller, end to end: a real
mosquitto, the whole service, virtual stations, and a test client that behaves like Home
Assistant's MQTT integration (reads the retained discovery, states and availability; publishes
its status and the entities' commands)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiomqtt
import pytest
from conftest import eventually, metric, public_id_of, seed_public_key, station_config

from openwb_modbus_evse.interfaces import homeassistant_messages as m
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

SERIAL, OTHER = virtual_serial(1), virtual_serial(2)
ident = public_id_of  # what the service names a station by on the broker (not its ID)


VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)
STATUS = "homeassistant/status"


class FakeHomeAssistant:
    """What Home Assistant's MQTT integration does on the wire."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.retained: dict[str, bytes] = {}  # the latest value of every topic, as HA holds it
        self.log: list[tuple[str, bytes, bool]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = bytes(message.payload)
            self.log.append((message.topic.value, payload, bool(message.retain)))
            self.retained[message.topic.value] = payload

    def config(self, serial: str = SERIAL) -> dict | None:
        raw = self.retained.get(m.discovery_topic("homeassistant", ident(serial)))
        return json.loads(raw) if raw else None

    def state(self, serial: str = SERIAL) -> dict:
        return json.loads(self.retained.get(m.state_topic(ident(serial)), b"{}"))

    def available(self, serial: str = SERIAL) -> bool:
        end = f"/station/{ident(serial)}/availability"
        return any(t.endswith(end) and v == b"online" for t, v in self.retained.items())

    async def command(self, serial: str, control: str, payload: str, retain: bool = False):
        await self.client.publish(m.command_topic(ident(serial), control), payload, retain=retain)

    async def status(self, payload: str, retain: bool = False) -> None:
        await self.client.publish(STATUS, payload, retain=retain)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def hass(broker, settings):
    # The service's key for public ids, as a previous run left it in the state file: the
    # stations' topics are known before the service starts.
    seed_public_key(settings.state_db)
    client = aiomqtt.Client("127.0.0.1", broker.port)
    await client.__aenter__()
    try:
        await client.subscribe("homeassistant/#")
        await client.subscribe(f"{m.TOPIC_ROOT}/#")
        fake = FakeHomeAssistant(client)
        yield fake
        with contextlib.suppress(aiomqtt.MqttError):  # a test may have stopped the broker
            await fake.close()
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


@pytest.fixture
def ha_settings(settings, broker):
    return broker.settings(
        settings,
        station=(
            station_config(1, 1, controller="homeassistant", name="Garage"),
            station_config(2, 2),  # driven over Modbus: shown, but HA's commands are refused
        ),
    )


async def running(make_rig, settings, **changes):
    rig = await make_rig(settings, **changes)
    await eventually(lambda: rig.bridge.mqtt.connected)
    return rig


def refusals(rig, reason: str) -> float:
    found = metric(
        rig.bridge,
        "openwb_modbus_evse_commands_refused_total",
        interface="homeassistant",
        reason=reason,
    )
    return found or 0.0


# --- what Home Assistant sees ------------------------------------------------------------------


async def test_every_station_appears_with_its_entities_and_states(ha_settings, make_rig, hass):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    await eventually(lambda: hass.config() is not None and hass.available())
    config = hass.config()
    assert config["dev"]["identifiers"] == [m.device_id(ident(SERIAL))]
    assert SERIAL.lower() not in json.dumps(config).lower()  # the ID is the station's secret
    assert config["dev"]["name"] == "Garage" and config["o"]["name"] == "openwb-modbus-evse"
    cmps = config["cmps"]
    assert cmps["charge_status"]["object_id"] == f"evse_{ident(SERIAL)[-8:]}_charge_status"
    assert cmps["energy"]["state_class"] == "total_increasing"
    assert cmps["energy"]["unit_of_measurement"] == "kWh"
    assert {c["p"] for c in cmps.values()} == {
        "sensor",
        "binary_sensor",
        "number",
        "switch",
        "button",
    }
    assert "phases" not in cmps  # no phase-switch command configured
    # the other station is there too (read-only for HA), and unavailable while it is away
    await eventually(lambda: hass.config(OTHER) is not None)
    assert not hass.available(OTHER)
    # states as the view shows them: plugged in, nothing offered (nobody enabled it)
    await eventually(lambda: hass.state().get("plugged") == "ON")
    state = hass.state()
    assert state["charge_status"] == "B" and state["charging"] == "OFF"
    assert state["enable"] == "OFF" and state["max_current"] == 32.0
    assert state["voltage_l1"] == 230.0 and state["rssi"] == station._data().rssi_dbm
    assert state["firmware"] == str(station.firmware)
    # the view's fault: Home Assistant has not been heard from yet; its status clears it
    assert state["fault"] == "no heartbeat from the controller (homeassistant): charging is stopped"
    await hass.status("online")
    await eventually(lambda: hass.state().get("fault") == "OK")
    assert hass.retained[rig.bridge.homeassistant.service_availability] == b"online"
    # the service stops: every entity becomes unavailable (the service's own availability)
    await rig.close()
    await eventually(
        lambda: hass.retained[rig.bridge.homeassistant.service_availability] == b"offline"
    )


async def test_ids_are_stable_across_restarts_and_lp_moves(ha_settings, make_rig, hass, broker):
    settings = broker.settings(ha_settings, station=(), admin_token="")
    rig = await running(make_rig, settings)
    await rig.station(1, VEHICLE)
    await eventually(lambda: hass.config() is not None)
    first = hass.config()
    rig.bridge.registry.move(SERIAL, 5)
    await asyncio.sleep(0.3)
    assert hass.config() == first  # an LP move changes nothing Home Assistant sees
    await rig.close()
    hass.retained.clear()
    rig = await running(make_rig, settings)
    await rig.station(1, VEHICLE)
    await eventually(lambda: hass.config() is not None)
    assert hass.config() == first


# --- control -----------------------------------------------------------------------------------


async def charging_at_16_a(rig, hass, station) -> None:
    await hass.status("online")
    await hass.command(SERIAL, "max_current", "16")
    await hass.command(SERIAL, "enable", "ON")
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=3)
    await eventually(lambda: hass.state().get("enable") == "ON")


async def test_number_and_switch_drive_the_station_through_the_control_path(
    ha_settings, make_rig, hass
):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    await charging_at_16_a(rig, hass, station)
    assert hass.state()["max_current"] == 16.0
    # the number changes the PWM at once
    await hass.command(SERIAL, "max_current", "10.0")
    await station.wait_for(lambda s: s.pwm == 16 and s.contactor, timeout=3)
    await eventually(lambda: hass.state().get("offered_current") == 9.6)
    await eventually(lambda: hass.state().get("charge_status") == "C")
    # switch off: the safe stop (PWM 100 % first, then the contactor opens)
    await hass.command(SERIAL, "enable", "OFF")
    await station.wait_for(lambda s: s.pwm == 100, timeout=2)
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    await eventually(lambda: hass.state().get("enable") == "OFF")
    # a bad value is refused, counted, and changes nothing
    await hass.command(SERIAL, "max_current", "40")
    await eventually(lambda: refusals(rig, "bad_value") == 1)
    assert hass.state()["max_current"] == 10.0
    # the pilot interruption button: state F for a while, then back
    await hass.command(SERIAL, "enable", "ON")
    await station.wait_for(lambda s: s.pwm == 16 and s.contactor, timeout=3)
    await hass.command(SERIAL, "pilot_interruption", "PRESS")
    await station.wait_for(lambda s: s.pwm == 0 and not s.contactor, timeout=3)


async def test_the_phases_select_switches_phases_the_safe_way(
    ha_settings, make_rig, hass, broker, tmp_path
):
    import shlex
    import sys

    out = tmp_path / "switched"
    script = f"import sys; open({str(out)!r}, 'a').write(sys.argv[-1])"
    command = shlex.join([sys.executable, "-c", script])
    settings = broker.settings(
        ha_settings,
        station=(station_config(1, 1, controller="homeassistant", phase_switch_command=command),),
    )
    rig = await running(make_rig, settings)
    station = await rig.station(1, VEHICLE)
    await eventually(lambda: "phases" in (hass.config() or {}).get("cmps", {}))
    await charging_at_16_a(rig, hass, station)
    await hass.command(SERIAL, "phases", "1")
    await station.wait_for(lambda s: s.pwm == 100, timeout=3)  # stops first
    await eventually(lambda: out.exists() and out.read_text() == "1", timeout=5)
    await eventually(lambda: hass.state().get("phases") == "1", timeout=5)
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=5)  # resumed
    await hass.command(SERIAL, "phases", "2")
    await eventually(lambda: refusals(rig, "bad_value") == 1)


async def test_another_controllers_station_shows_the_controls_but_refuses_them(
    ha_settings, make_rig, hass, caplog
):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(2, VEHICLE)
    await hass.status("online")
    caplog.set_level(logging.WARNING)
    await hass.command(OTHER, "enable", "ON")
    await eventually(lambda: refusals(rig, "not_controller") == 1)
    assert "controlled by modbus, not homeassistant" in caplog.text
    await eventually(lambda: hass.state(OTHER).get("enable") == "OFF")
    assert station.pwm == 100


async def test_home_assistant_going_offline_stops_charging_until_a_new_command(
    ha_settings, make_rig, hass
):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    await charging_at_16_a(rig, hass, station)
    await hass.status("offline")  # what its last will says when its connection dies
    await station.wait_for(lambda s: s.pwm == 100, timeout=2)
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    await eventually(lambda: hass.state().get("enable") == "OFF")
    # a command while it is offline is not carried out
    await hass.command(SERIAL, "enable", "ON")
    await eventually(lambda: refusals(rig, "offline") == 1)
    # back online: nothing charges by itself ...
    await hass.status("online")
    await asyncio.sleep(0.5)
    assert station.pwm == 100 and not station.contactor
    # ... only on a new command
    await hass.command(SERIAL, "enable", "ON")
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=3)


async def test_losing_the_broker_stops_charging(ha_settings, make_rig, hass, broker):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    await charging_at_16_a(rig, hass, station)
    broker.stop()
    await station.wait_for(lambda s: s.pwm == 100, timeout=3)
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    assert rig.bridge.homeassistant.heartbeat.lapsed


async def test_a_retained_command_is_not_carried_out(ha_settings, make_rig, hass, broker):
    async with aiomqtt.Client("127.0.0.1", broker.port) as old:
        await old.publish(m.command_topic(ident(SERIAL), "enable"), "ON", retain=True)
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    await eventually(lambda: refusals(rig, "replay") == 1)
    await hass.status("online")
    await asyncio.sleep(0.5)
    assert station.pwm == 100 and hass.state().get("enable") == "OFF"


async def test_home_assistant_restarting_gets_everything_again(ha_settings, make_rig, hass):
    rig = await running(make_rig, ha_settings)
    await rig.station(1, VEHICLE)
    await eventually(lambda: hass.config() is not None)
    since = len(hass.log)
    await hass.status("online")
    topic = m.discovery_topic("homeassistant", ident(SERIAL))
    await eventually(lambda: any(t == topic for t, _, _ in hass.log[since:]))
    state = m.state_topic(ident(SERIAL))
    await eventually(lambda: any(t == state for t, _, _ in hass.log[since:]))


async def test_a_forgotten_station_disappears(ha_settings, make_rig, hass, broker):
    settings = broker.settings(ha_settings, station=())
    rig = await running(make_rig, settings)
    station = await rig.station(1, VEHICLE)
    await eventually(lambda: hass.config() is not None)
    await eventually(lambda: rig.bridge.registry.stations()[0]["remembered"])
    await station.stop()
    await eventually(lambda: not rig.point(SERIAL).state.connected)
    await eventually(lambda: not hass.available())
    rig.bridge.registry.forget(SERIAL)
    topic = m.discovery_topic("homeassistant", ident(SERIAL))
    await eventually(lambda: hass.retained.get(topic) == b"")
    async with aiomqtt.Client("127.0.0.1", broker.port) as late:  # nothing retained is left
        await late.subscribe(topic)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await anext(late.messages)


async def test_what_a_crashed_run_left_behind_is_withdrawn(ha_settings, make_rig, hass, broker):
    import socket

    gone = virtual_serial(77)  # a newcomer served when the last run died, never seen again
    service_id = f"{socket.gethostname()}-{ha_settings.evse_port}"
    async with aiomqtt.Client("127.0.0.1", broker.port) as old:
        station = m.Station(ident(gone), m.default_name(ident(gone)), 32.0, False)
        config = m.encode(m.discovery(station, service_id))
        await old.publish(m.discovery_topic("homeassistant", ident(gone)), config, retain=True)
        await old.publish(m.availability_topic(service_id, ident(gone)), "online", retain=True)
    await eventually(lambda: hass.config(gone) is not None and hass.available(gone))
    rig = await running(make_rig, ha_settings)
    topic = m.discovery_topic("homeassistant", ident(gone))
    await eventually(lambda: hass.retained[topic] == b"")
    await eventually(lambda: not hass.available(gone))  # its availability is deleted too
    assert rig.bridge.homeassistant.announced <= {SERIAL, OTHER}


async def test_the_max_current_is_kept_across_a_restart(ha_settings, make_rig, hass):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    await charging_at_16_a(rig, hass, station)
    await rig.close()
    hass.retained.clear()
    rig = await running(make_rig, ha_settings)
    await eventually(lambda: hass.state().get("max_current") == 16.0)
    assert hass.state()["enable"] == "OFF"  # enable is a live command, not kept


async def test_the_first_command_after_start_up_counts_as_home_assistant_being_there(
    ha_settings, make_rig, hass
):
    rig = await running(make_rig, ha_settings)
    station = await rig.station(1, VEHICLE)
    assert rig.bridge.homeassistant.heartbeat.lapsed  # nothing heard yet: nothing charges
    await hass.command(SERIAL, "enable", "ON")  # no status: Home Assistant started earlier
    await station.wait_for(lambda s: s.pwm == 53 and s.contactor, timeout=3)  # 32 A


async def test_commands_are_bounded_in_size_and_rate(ha_settings, make_rig, hass):
    rig = await running(make_rig, ha_settings)
    await rig.station(1, VEHICLE)
    await hass.status("online")
    await hass.command(SERIAL, "max_current", "1" * 100)
    await eventually(lambda: refusals(rig, "bad_value") == 1)
    for _ in range(300):  # far beyond the burst: the rest is refused, counted, not queued
        await hass.command(SERIAL, "max_current", "16")
    await eventually(lambda: refusals(rig, "rate") > 0)
    await eventually(lambda: hass.state().get("max_current") == 16.0)
    assert rig.bridge.homeassistant.heartbeat.lapsed is False


# --- the messages (pure) -----------------------------------------------------------------------


def shown_with(pilot, **changes):
    from dataclasses import replace

    from conftest import idle_data

    from openwb_modbus_evse.view import FAULT_OK, Freshness, Shown

    data = idle_data(pilot=pilot)
    shown = Shown(
        Freshness.FRESH,
        data,
        0.0,
        (0.0, 0.0, 0.0),
        (0.0, 0.0, 0.0),
        (230.0, 230.0, 230.0),
        pilot.plugged,
        False,
        0.0,
        0,
        32.0,
        0.0,
        FAULT_OK,
        "",
    )
    return replace(shown, **changes)


def test_the_charge_status_is_the_iec_61851_state_evcc_understands():
    from openwb_modbus_evse.evse.protocol import Pilot

    cases = {
        Pilot.A_12V: "A",
        Pilot.B_9V: "B",
        Pilot.C_6V: "C",
        Pilot.D_3V: "C",
        Pilot.FAULT: "E",
        Pilot.MINUS_12V: "F",
        Pilot.UNKNOWN: "F",
    }
    for pilot, status in cases.items():
        assert m.charge_status(shown_with(pilot), interrupting=False) == status, pilot
    # a pilot interruption holds -12 V on purpose: the plug state from before, no fault
    assert m.charge_status(shown_with(Pilot.MINUS_12V, plugged=True), interrupting=True) == "B"
    assert m.charge_status(shown_with(Pilot.A_12V, data=None), interrupting=False) == "F"
    assert set(m.STATUSES) == {"A", "B", "C", "E", "F"}


def test_unknown_voltages_are_null_and_the_choice_is_shown():
    from openwb_modbus_evse.evse.protocol import Pilot

    shown = shown_with(Pilot.B_9V, voltages_v=(None, None, None))
    values = m.state(
        shown,
        choice=m.Choice(1600, True),
        energy_kwh=1.23456,
        phases=3,
        firmware=None,
        interrupting=False,
    )
    assert values["voltage_l1"] is None and values["firmware"] is None
    assert values["energy"] == 1.235 and values["max_current"] == 16.0
    assert values["enable"] == "ON" and values["phases"] == "3"


def test_commands_parse_strictly():
    assert m.parse_max_current(b"16") == 1600 and m.parse_max_current(b"6.5") == 650
    for bad in (b"5.9", b"32.5", b"nan", b"inf", b"", b"sixteen", "16\u00a0".encode()):
        with pytest.raises(m.cp.Refused):
            m.parse_max_current(bad)
    assert m.parse_switch(b"ON") is True and m.parse_switch(b"OFF") is False
    with pytest.raises(m.cp.Refused):
        m.parse_switch(b"on ")
    assert m.parse_phases(b"1") == 1
    with pytest.raises(m.cp.Refused):
        m.parse_phases(b"2")
    with pytest.raises(m.cp.Refused):
        m.parse_press(b"PRESSED")
    assert m.parse_command_topic(m.command_topic(SERIAL, "enable")) == (SERIAL, "enable")
    assert m.parse_command_topic(f"{m.TOPIC_ROOT}/{SERIAL}/set/other") is None


# --- settings ----------------------------------------------------------------------------------


def test_settings_of_home_assistant():
    from openwb_modbus_evse import config

    broker = {"mqtt_host": "127.0.0.1"}
    assert config.build(broker).ha_discovery is True
    assert config.build(broker).ha_discovery_prefix == "homeassistant"
    assert config.build({**broker, "controller": "homeassistant"}).controller == "homeassistant"
    with pytest.raises(config.ConfigError, match="'homeassistant' needs mqtt_host"):
        config.build({"controller": "homeassistant"})
    with pytest.raises(config.ConfigError, match="needs ha_discovery"):
        config.build({**broker, "controller": "homeassistant", "ha_discovery": False})
    station = {"serial": SERIAL, "controller": "homeassistant"}
    with pytest.raises(config.ConfigError, match=r"station\[0\].controller"):
        config.build({**broker, "ha_discovery": False, "station": [station]})
    for bad in ("", "home/", "/home", "ha/#", 5):
        with pytest.raises(config.ConfigError, match="ha_discovery_prefix"):
            config.build({**broker, "ha_discovery_prefix": bad})
    assert config.build({**broker, "ha_discovery_prefix": "ha/one"}).ha_discovery_prefix == "ha/one"


async def test_without_ha_discovery_nothing_is_announced(ha_settings, make_rig, hass, broker):
    rig = await running(make_rig, broker.settings(ha_settings, station=(), ha_discovery=False))
    await rig.station(1, VEHICLE)
    await asyncio.sleep(0.5)
    assert rig.bridge.homeassistant is None and hass.config() is None


async def test_commands_for_made_up_stations_are_refused_and_kept_nowhere(
    ha_settings, make_rig, hass
):
    rig = await running(make_rig, ha_settings)
    await hass.status("online")
    for index in range(100, 140):
        await hass.command(virtual_serial(index), "enable", "ON")
    await eventually(lambda: refusals(rig, "offline") == 40)
    assert not any(virtual_serial(100) in key for key in rig.bridge.control._last_refusal)
    assert len(rig.bridge.homeassistant.choices) <= 2
