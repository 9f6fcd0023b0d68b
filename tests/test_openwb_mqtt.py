"""The openWB MQTT secondary API end to end: a real mosquitto, a primary that behaves like
openWB's own module, the whole bridge and virtual stations over TCP."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import eventually, station_config
from openwb_primary import Primary, read_json
from test_control import FAST_VEHICLE, read, relay_command, write

from openwb_modbus_evse.tools.simulator import virtual_serial

MANDATORY = (
    "power",
    "imported",
    "exported",
    "currents",
    "phases_in_use",
    "plug_state",
    "charge_state",
    "fault_state",
)
HEARTBEAT_TIMEOUT = 1.5


@pytest.fixture
def mqtt_settings(settings, broker):
    """Settings with MQTT on: every station driven by the openWB primary by default."""
    return broker.settings(
        settings, mqtt_heartbeat_timeout=HEARTBEAT_TIMEOUT, controller="openwb-mqtt"
    )


async def charging_at_16(rig, primary, index=1):
    # Connected first: a heartbeat sent before would reach the service as a retained replay.
    await eventually(lambda: rig.bridge.mqtt.connected)
    station = await rig.station(index, FAST_VEHICLE)
    await station.wait_for(lambda s: s.plugged)
    await primary.cycle(16)
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor and any(s.currents_ma))
    return station


async def set_topics_left(broker, within: float = 2.0) -> dict:
    """The set topics the broker still holds (retained) once the service had ``within`` s to
    clear them (a heartbeat published just before may still be on its way)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = await read_json(broker.port, "openWB/set/#", 0.2, retained_only=True)
        if not left or loop.time() > deadline:
            return left


async def test_set_current_16_charges_at_pwm_26_and_get_shows_it(broker, mqtt_settings, make_rig):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        await asyncio.sleep(0.6)  # a poll or two with current flowing
        values = await primary.read()
    assert set(MANDATORY) <= set(values)
    assert values["plug_state"] is True and values["charge_state"] is True
    assert values["fault_state"] == 0 and values["fault_str"] == ""
    assert values["evse_current"] == 15.6  # PWM 26 %
    assert values["max_evse_current"] == 32
    assert values["phases_in_use"] == 3 and values["currents"][0] > 6
    assert values["power"] > 4000 and values["voltages"][0] > 200
    assert values["serial_number"] == rig.serial_number(station.serial)
    assert values["version"].startswith("openwb-modbus-evse ")
    assert await set_topics_left(broker) == {}  # every processed set topic is cleared
    # Modbus reads the same charge point.
    client = await rig.client()
    assert (await read(client))["charging"] == 1


async def test_phase_switch_and_pilot_interruption_run_their_sequences(
    broker, mqtt_settings, make_rig, tmp_path
):
    command, out = relay_command(tmp_path, sleep=0.1)
    station_cfg = station_config(1, lp=1, phase_switch_command=command)
    rig = await make_rig(mqtt_settings, station=(station_cfg,))
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        await primary.send("phases_to_use", 1)
        await primary.send("trigger_phase_switch", True)
        await station.wait_for(lambda s: s.pwm == 100, timeout=2)  # safe stop first
        await station.wait_for(lambda s: not s.contactor, timeout=3)
        await eventually(lambda: out.exists() and out.read_text() == "1\n", timeout=3)
        await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=4)  # resumed
        assert rig.point(station.serial).state.phases == 1

        loop = asyncio.get_running_loop()
        await primary.send("cp_interruption_duration", 1)
        await station.wait_for(lambda s: s.pwm == 0 and not s.contactor, timeout=3)  # state F
        held = loop.time()
        await station.wait_for(lambda s: s.pwm == 26, timeout=3)
        assert 0.8 < loop.time() - held < 3.0
        await station.wait_for(lambda s: s.contactor, timeout=3)
    assert out.read_text() == "1\n"  # the switch ran once
    assert await set_topics_left(broker) == {}


async def test_heartbeat_lapse_stops_and_the_next_heartbeat_resumes(
    broker, mqtt_settings, make_rig
):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
    loop = asyncio.get_running_loop()
    last = loop.time()
    await station.wait_for(lambda s: s.pwm == 100, timeout=HEARTBEAT_TIMEOUT + 2)
    assert loop.time() - last > HEARTBEAT_TIMEOUT - 0.3
    await station.wait_for(lambda s: not s.contactor, timeout=3)
    values = await primary.read(0.5)
    assert values["fault_state"] == 1 and "heartbeat" in values["fault_str"]
    assert values["charge_state"] is False
    assert rig.point(station.serial).state.requested_ca == 1600  # kept
    await primary.heartbeat()  # back: the last set current applies again
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=3)
    assert rig.bridge.openwb.heartbeats[""].clock.recoveries == 2  # first beat, then this one


async def test_a_retained_replay_does_not_count_but_a_newer_heartbeat_does(
    broker, mqtt_settings, make_rig
):
    primary = Primary(broker.port)
    # What a primary left on the broker before the service started.
    old = await primary.heartbeat()
    await primary.send("set_current", 16)
    await primary.send("trigger_phase_switch", True)
    await primary.send("cp_interruption_duration", 5)
    rig = await make_rig(mqtt_settings, station=(station_config(1, lp=1),))
    station = await rig.station(1, FAST_VEHICLE)
    await station.wait_for(lambda s: s.plugged)
    await eventually(lambda: rig.point(station.serial).state.requested_ca == 1600)
    await asyncio.sleep(0.5)
    point = rig.point(station.serial)
    assert point.state.heartbeat_lapsed and station.pwm == 100  # the replay did not count
    assert point.state.sequence is None  # no interruption from a replayed command
    assert await set_topics_left(broker) == {}  # and the replayed commands are gone
    await primary.heartbeat(old)  # live, but not newer than the last one: not fresh
    await asyncio.sleep(0.5)
    assert station.pwm == 100
    await primary.heartbeat(old + 10)
    await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=3)


@pytest.mark.parametrize("offset", [-600.0, 600.0])
async def test_a_primary_clock_10_minutes_off_works(broker, mqtt_settings, make_rig, offset):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port, clock_offset=offset)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        await asyncio.sleep(HEARTBEAT_TIMEOUT + 0.5)  # well past the timeout: still charging
        assert station.pwm == 26 and station.contactor
    await station.wait_for(lambda s: s.pwm == 100, timeout=HEARTBEAT_TIMEOUT + 2)


async def test_broker_restart_mid_charge_loses_nothing(broker, mqtt_settings, make_rig):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():  # a primary that keeps trying while the broker is away
        station = await charging_at_16(rig, primary)
        await asyncio.sleep(0.6)
        before = await primary.read(0.5)
        client = await rig.client()
        await broker.restart()  # without persistence: every retained value is gone
        assert (await read(client))["charging"] == 1  # Modbus did not notice
        mqtt = rig.bridge.mqtt
        await eventually(lambda: mqtt.connected and mqtt.connects == 2, timeout=5)
        await primary.cycle(16)
        after = await primary.read(1.0)
    assert set(after) == set(before)  # every value is there again
    assert after["charge_state"] is True and after["imported"] >= before["imported"]
    assert station.contactor and station.pwm == 26 and station.connections == 1


BAD = [
    ("set_current", "-5", "discharging"),
    ("set_current", "3", "0 or 6..32"),
    ("set_current", "5.99", "0 or 6..32"),
    ("set_current", "33", "0 or 6..32"),
    ("set_current", '"16"', "number"),
    ("set_current", "true", "number"),
    ("set_current", "null", "number"),
    ("set_current", "{no json", "not JSON"),
    ("phases_to_use", "2", "1 or 3"),
    ("phases_to_use", '"3"', "integer"),
    ("phases_to_use", "3.5", "integer"),
    ("trigger_phase_switch", "1", "true or false"),
    ("cp_interruption_duration", "-1", "0 or more"),
    ("cp_interruption_duration", "61", "1..60"),
    ("cp_interruption_duration", "2.5", "integer"),
    ("parent_cp", "[1]", "string"),
]


async def test_every_bad_payload_is_ignored_logged_once_and_cleared(
    broker, mqtt_settings, make_rig, caplog
):
    caplog.set_level(logging.INFO)
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        point = rig.point(station.serial)
        state = point.state
        for name, payload, _ in BAD:
            for _ in range(2):  # as every control cycle repeats it: logged once
                await primary.publish(primary.topic(name), payload)
        for topic, payload in (
            ("global_data", '"x"'),
            ("global_data", '{"heartbeat": "now"}'),
            ("last_tag", '"04A3B2"'),
        ):
            await primary.publish(primary.global_topic(topic), payload)
        await asyncio.sleep(0.5)
        assert (point.state.requested_ca, point.state.phase_target, point.state.sequence) == (
            state.requested_ca,
            state.phase_target,
            None,
        )
        assert station.pwm == 26 and station.contactor
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for name, payload, words in BAD:
        hits = [w for w in warnings if f"/{name} ignored" in w and words in w]
        assert hits, (name, payload, words)
    assert len(warnings) == len(BAD) + 3, warnings
    assert await set_topics_left(broker) == {}
    # A peer that sends a new bad value every time cannot flood the log: a burst of 20 lines,
    # then one a second.
    before = len(caplog.records)
    for amps in range(40, 80):
        await primary.send("set_current", amps)
    await asyncio.sleep(0.3)
    assert len(caplog.records) - before <= 20 + 1
    refused = rig.bridge.metrics.registry.get_sample_value(
        "openwb_modbus_evse_commands_refused_total",
        {"interface": "openwb-mqtt", "reason": "bad_value"},
    )
    assert refused == 2 * len(BAD) + 3 + 40  # every one counted


async def test_what_the_primary_sends_cannot_forge_log_lines(
    broker, mqtt_settings, make_rig, caplog
):
    caplog.set_level(logging.INFO)
    rig = await make_rig(mqtt_settings)
    await eventually(lambda: rig.bridge.mqtt.connected)
    primary = Primary(broker.port)
    await primary.send("parent_cp", "7\nCRITICAL forged line \x1b[2J")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "charge point 7" in r.getMessage()]

    await eventually(logged)
    assert logged() == [
        "openWB/internal_chargepoint/0 is charge point 7\\nCRITICAL forged line \\x1b[2J"
        " of the openWB primary"
    ]


async def test_writes_from_the_interface_that_does_not_control_are_refused(
    broker, mqtt_settings, make_rig
):
    stations = (
        station_config(1, lp=1),  # the global default: openwb-mqtt
        station_config(2, lp=2, controller="modbus"),
    )
    rig = await make_rig(mqtt_settings, station=stations, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    client = await rig.client()
    lp1, lp2 = Primary(broker.port, duo=0), Primary(broker.port, duo=1)
    async with lp1.beating():
        one = await charging_at_16(rig, lp1, index=1)
        two = await rig.station(2, FAST_VEHICLE)
        await two.wait_for(lambda s: s.plugged)
        assert await write(client, 1, "set_current", 1000) == 1  # Modbus may not drive LP1
        assert await write(client, 1, "heartbeat", 0) == 1
        assert await write(client, 2, "set_current", 1000) is None
        await two.wait_for(lambda s: s.pwm == 16 and s.contactor)
        await lp2.send("set_current", 6)  # the primary may not drive LP2
        await asyncio.sleep(0.3)
        assert rig.point(two.serial).state.requested_ca == 1000
        assert rig.point(one.serial).state.requested_ca == 1600
        # Reads work everywhere: LP1 over Modbus, LP2 over MQTT (with a warning).
        assert (await read(client, 1))["charging"] == 1
        values = await lp2.read(0.5)
        assert values["charge_state"] is True and values["fault_state"] == 1
        assert "modbus" in values["fault_str"]
        # Each heartbeat applies to its own stations: no Modbus request for a while...
        await two.wait_for(lambda s: s.pwm == 100, timeout=HEARTBEAT_TIMEOUT + 2)
        assert one.pwm == 26
    # ...and no MQTT heartbeat: LP1 stops, LP2 resumes with the next Modbus request.
    await read(client, 2)
    await one.wait_for(lambda s: s.pwm == 100, timeout=HEARTBEAT_TIMEOUT + 2)
    await two.wait_for(lambda s: s.pwm == 16, timeout=2)
    refused = rig.bridge.metrics.registry.get_sample_value
    name = "openwb_modbus_evse_commands_refused_total"
    assert refused(name, {"interface": "modbus", "reason": "not_controller"}) == 2
    assert refused(name, {"interface": "openwb-mqtt", "reason": "not_controller"}) == 1


async def test_an_offline_station_is_a_warning_with_the_plug_held_a_missing_one_fault_2(
    broker, mqtt_settings, make_rig
):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        # a new station is kept after it leaves once its LP is remembered (lp_remember_after)
        await eventually(lambda: station.serial in rig.bridge.registry.store.lp_assignments())
        await station.stop()
        await asyncio.sleep(3 * 0.5 + 0.5)  # stale after 3 polls, republished then
        values = await primary.read(0.5)
    # As on Modbus: the plug state is held for the station's own 300 s safety timeout, so that a
    # Wi-Fi hiccup does not end the primary's charging session; a warning says why.
    assert values["fault_state"] == 1 and "not connected" in values["fault_str"]
    assert values["plug_state"] is True
    assert values["charge_state"] is False and values["power"] == 0
    assert values["currents"] == [0, 0, 0]
    empty = await Primary(broker.port, duo=1).read(0.5)
    assert empty["fault_state"] == 2 and "no station is LP2" in empty["fault_str"]
    assert set(MANDATORY) <= set(empty)


async def test_a_configured_tree_with_a_prefix_and_a_station_with_only_a_controller(
    broker, mqtt_settings, make_rig
):
    from dataclasses import replace

    from openwb_modbus_evse.config import StationConfig

    stations = (
        StationConfig(serial=virtual_serial(1), controller="openwb-mqtt"),  # no other keys
        station_config(2, lp=3, mqtt_prefix="lp3/", controller="openwb-mqtt"),
    )
    rig = await make_rig(replace(mqtt_settings, controller="modbus"), station=stations)
    lp3 = Primary(broker.port, prefix="lp3/")
    one = await rig.station(1, FAST_VEHICLE)
    assert rig.point(one.serial).identity.lp == 1  # the lowest free LP
    async with Primary(broker.port).beating():
        # the same station again would be refused as an impostor: `one` answers its probe
        await one.wait_for(lambda s: s.plugged)
        await Primary(broker.port).cycle(16)
        await one.wait_for(lambda s: s.pwm == 26 and s.contactor and any(s.currents_ma))
    three = await rig.station(2, FAST_VEHICLE)
    await three.wait_for(lambda s: s.plugged)
    async with lp3.beating():  # its own heartbeat, under its prefix
        await lp3.send("set_current", 10)
        await three.wait_for(lambda s: s.pwm == 16 and s.contactor)
        await asyncio.sleep(0.6)
        values = await lp3.read(0.5)
    assert values["charge_state"] is True and values["fault_state"] == 0
    assert "lp3/" in rig.bridge.openwb.heartbeats


# --- the service as a process: last will and clean stop --------------------------------------


async def _serving_process(tmp_path, broker):
    from test_service import VEHICLE, Service

    from openwb_modbus_evse.tools.simulator import VirtualStation

    svc = Service(
        tmp_path,
        mqtt_host='"127.0.0.1"',
        mqtt_port=broker.port,
        controller='"openwb-mqtt"',
        mqtt_heartbeat_timeout=5,
    )
    await svc.start()
    station = VirtualStation(
        virtual_serial(1), bridge=("127.0.0.1", svc.evse_port), vehicle=VEHICLE
    )
    await station.start()
    primary = Primary(broker.port)
    for _ in range(50):  # the service is connected once its values are there
        if "fault_state" in await primary.read(0.1):
            break
    await station.wait_for(lambda s: s.plugged, timeout=5)
    await primary.cycle(16)
    await station.wait_for(lambda s: s.contactor, timeout=5)
    await asyncio.sleep(0.5)
    values = await primary.read(0.5)
    assert values["fault_state"] == 0 and values["charge_state"] is True
    return svc, station, primary


@pytest.mark.slow
async def test_the_last_will_marks_every_charge_point_faulted_when_the_service_dies(
    tmp_path, broker
):
    svc, station, _ = await _serving_process(tmp_path, broker)
    try:
        svc.proc.kill()
        svc.proc.wait()
        await asyncio.sleep(0.3)
        for duo in (0, 1):
            values = await Primary(broker.port, duo=duo).read(0.3)
            assert values["fault_state"] == 2 and "not running" in values["fault_str"]
            # No stale power or charging is left for the primary (it was charging on duo 0).
            assert values["power"] == 0 and values["charge_state"] is False
    finally:
        await station.stop()
        svc.stop()


@pytest.mark.slow
async def test_a_clean_stop_publishes_stopped_and_not_charging(tmp_path, broker):
    svc, station, primary = await _serving_process(tmp_path, broker)
    try:
        svc.proc.terminate()
        assert await asyncio.to_thread(svc.proc.wait, 15) == 0
        values = await primary.read(0.3)
        assert values["fault_state"] == 2 and "stopped" in values["fault_str"]
        assert values["charge_state"] is False and values["power"] == 0
    finally:
        await station.stop()
        svc.stop()


async def test_status_shows_which_controller_drives_each_lp(broker, mqtt_settings, make_rig):
    from conftest import free_port

    from openwb_modbus_evse.tools.status import format_table, read_status

    stations = (station_config(1, lp=1), station_config(2, lp=2, controller="modbus"))
    metrics_port = free_port()
    rig = await make_rig(
        mqtt_settings, station=stations, metrics_host="127.0.0.1", metrics_port=metrics_port
    )
    for i in (1, 2):
        await rig.station(i, FAST_VEHICLE)
    rows = await read_status("127.0.0.1", rig.modbus_port, metrics_port=metrics_port)
    assert [(r.lp, r.controller) for r in rows] == [(1, "openwb-mqtt"), (2, "modbus")]
    assert format_table(rows).splitlines()[1].endswith("openwb-mqtt")
    # The status page's API says the same, with the age of each controller's own heartbeat.
    import json
    import urllib.request

    url = f"http://127.0.0.1:{metrics_port}/api/status"
    page = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url).read()))
    cards = {c["lp"]: c for c in page["charge_points"]}
    assert (cards[1]["controller"], cards[2]["controller"]) == ("openwb-mqtt", "modbus")
    assert cards[1]["heartbeat_lapsed"]  # no primary yet; the Modbus clock is fresh
    assert not cards[2]["heartbeat_lapsed"]
    # A secondary without these metrics (a real openWB): the column shows "-".
    rows = await read_status("127.0.0.1", rig.modbus_port, metrics_port=free_port())
    assert [r.controller for r in rows] == [None, None]
    assert format_table(rows).splitlines()[1].endswith(" -")


# --- what the primary sees when things go wrong (issue 18) ----------------------------------


async def watch(port: int, topic_filter: str, seconds: float) -> list[tuple[str, object]]:
    """Every message (topic tail, JSON value) under ``topic_filter`` for ``seconds``, in order."""
    import json

    import aiomqtt

    seen: list[tuple[str, object]] = []

    async def collect() -> None:
        async with aiomqtt.Client("127.0.0.1", port, clean_session=True) as client:
            await client.subscribe(topic_filter)
            async for message in client.messages:
                payload = bytes(message.payload)
                tail = message.topic.value.rsplit("/", 1)[-1]
                seen.append((tail, json.loads(payload) if payload else None))

    task = asyncio.create_task(collect())
    await asyncio.sleep(seconds)
    task.cancel()
    # aiomqtt on Python 3.11 may swallow a cancellation: do not wait for it for ever.
    await asyncio.wait({task}, timeout=2)
    return list(seen)


async def test_a_refused_phase_switch_is_a_warning_until_a_command_goes_through(
    broker, mqtt_settings, make_rig
):
    rig = await make_rig(mqtt_settings)  # no phase_switch_command: wired for 3 phases only
    primary = Primary(broker.port)
    async with primary.beating():
        await charging_at_16(rig, primary)
        await primary.send("phases_to_use", 1)
        await asyncio.sleep(0.3)
        values = await primary.read(0.3)
        assert values["fault_state"] == 1 and "phase_switch_command" in values["fault_str"]
        await primary.send("phases_to_use", 3)  # what the station has: accepted
        await asyncio.sleep(0.3)
        values = await primary.read(0.3)
        assert values["fault_state"] == 0 and values["fault_str"] == ""


async def test_a_requested_pilot_interruption_keeps_the_vehicle_plugged_and_no_fault(
    broker, mqtt_settings, make_rig
):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        base = "openWB/internal_chargepoint/0/get/"
        watching = asyncio.create_task(watch(broker.port, base + "+", 3.0))
        await asyncio.sleep(0.3)
        await primary.send("cp_interruption_duration", 1)
        await station.wait_for(lambda s: s.pwm == 0, timeout=3)  # state F
        await station.wait_for(lambda s: s.pwm == 26 and s.contactor, timeout=4)
        seen = await watching
    plug = [v for name, v in seen if name == "plug_state"]
    faults = [v for name, v in seen if name == "fault_state"]
    assert False not in plug, seen  # the session goes on
    assert 2 not in faults, seen  # no "control-pilot fault" flash


async def test_one_far_future_heartbeat_from_anyone_stops_nothing(broker, mqtt_settings, make_rig):
    rig = await make_rig(mqtt_settings)
    primary = Primary(broker.port)
    async with primary.beating():
        station = await charging_at_16(rig, primary)
        attacker = Primary(broker.port)
        await attacker.publish(attacker.global_topic("global_data"), '{"heartbeat": 4102444800}')
        await asyncio.sleep(HEARTBEAT_TIMEOUT + 1.0)  # the primary's own beats go on
        assert station.pwm == 26 and station.contactor
        assert not rig.bridge.openwb.heartbeats[""].clock.lapsed
