"""The owner's controls: the manual controller and switching a station's controller at runtime.

Every action goes through the admin API (token) and the control path; the effect is checked at
the virtual station (PWM, contactor, pilot), and what is kept survives a restart.
"""

from __future__ import annotations

import pytest
from conftest import eventually, free_port, metric
from test_actions import TOKEN, cli, http

from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

SERIAL = virtual_serial(1)
BASE = f"/api/stations/{SERIAL}"


@pytest.fixture
def web_settings(settings):
    from dataclasses import replace

    return replace(
        settings,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        admin_token=TOKEN,
        heartbeat_timeout=1.0,
    )


async def test_owner_takes_a_station_from_modbus_sets_stops_and_gives_it_back(
    make_rig, web_settings
):
    rig = await make_rig(web_settings)
    station = await rig.station(1)
    client = await rig.client()
    set_current = REGISTER_MAP.address(1, "set_current")
    # Not its controller yet: refused with the reason, nothing changes.
    status, body = await http(rig, "POST", f"{BASE}/current", json={"amps": 10})
    assert status == 409
    assert body["error"] == (
        "this charge point is controlled by modbus, not manual: switch its controller to manual "
        "first"
    )
    assert (
        metric(
            rig.bridge,
            "openwb_modbus_evse_commands_refused_total",
            interface="manual",
            reason="not_controller",
        )
        == 1
    )
    status, body = await http(rig, "POST", f"{BASE}/controller", json={"controller": "manual"})
    assert (status, body) == (200, {"ok": True, "controller": "manual"})
    assert rig.point(SERIAL).state.config.controller == "manual"
    # The old controller's writes are refused now.
    answer = await client.write_register(set_current, 1600, device_id=1)
    assert answer.isError()

    status, body = await http(rig, "POST", f"{BASE}/current", json={"amps": 10})
    assert (status, body) == (200, {"ok": True, "amps": 10.0})
    await station.wait_for(lambda s: s.contactor and s.pwm == 16)  # 10 A = 16 %
    # No heartbeat: the owner's choice stays although no controller speaks (timeout 1 s).
    await eventually(lambda: rig.bridge.modbus_heartbeat.lapsed, timeout=5)
    assert station.contactor and station.pwm == 16

    for body, error in (
        ({"amps": 3}, "current must be 0 or 600..3200, got 300"),
        ({"amps": "ten"}, 'send {"amps": A} with A 0 (stop) or 6..32'),
        ({"amps": 99}, 'send {"amps": A} with A 0 (stop) or 6..32'),
    ):
        status, answer = await http(rig, "POST", f"{BASE}/current", json=body)
        assert status == 400 and answer["error"] == error, answer
    assert rig.point(SERIAL).state.requested_ca == 1000  # nothing changed

    status, _ = await http(rig, "POST", f"{BASE}/stop")
    assert status == 200
    await station.wait_for(lambda s: not s.contactor and s.pwm == 100)

    status, body = await http(rig, "POST", f"{BASE}/controller", json={"controller": "modbus"})
    assert status == 200
    assert rig.point(SERIAL).state.requested_ca == 0  # Modbus starts from nothing
    assert not (await client.write_register(set_current, 1600, device_id=1)).isError()
    await station.wait_for(lambda s: s.contactor, timeout=5)
    # Unknown controller, or one that cannot run here: refused with the reason.
    for name, error in (
        ("ocpp9", "controller must be one of"),
        ("openwb-mqtt", "openwb-mqtt needs mqtt_host in the config"),
    ):
        status, body = await http(rig, "POST", f"{BASE}/controller", json={"controller": name})
        assert status == 400 and body["error"].startswith(error), body
    status, body = await http(rig, "POST", "/api/stations/" + "0" * 32 + "/stop")
    assert status == 404


async def test_pilot_interruption_by_the_owner(make_rig, web_settings):
    rig = await make_rig(web_settings)
    station = await rig.station(1)
    await http(rig, "POST", f"{BASE}/controller", json={"controller": "manual"})
    await http(rig, "POST", f"{BASE}/current", json={"amps": 16})
    await station.wait_for(lambda s: s.contactor)
    for body in ({"seconds": 0}, {"seconds": "2"}):
        status, answer = await http(rig, "POST", f"{BASE}/cp-interruption", json=body)
        assert status == 400, answer
    status, _ = await http(rig, "POST", f"{BASE}/cp-interruption", json={"seconds": 2})
    assert status == 200
    await station.wait_for(lambda s: s.pwm == 0 and not s.contactor)  # state F
    status, body = await http(rig, "POST", f"{BASE}/cp-interruption", json={"seconds": 2})
    assert status == 409 and "a cp_interruption is running" in body["error"]
    await station.wait_for(lambda s: s.contactor, timeout=8)  # resumes: the choice stays


async def test_controller_and_manual_current_survive_a_restart(make_rig, web_settings):
    rig = await make_rig(web_settings)
    await rig.station(1)
    await eventually(lambda: rig.point(SERIAL).identity.lp == 1)
    await http(rig, "POST", f"{BASE}/controller", json={"controller": "manual"})
    await http(rig, "POST", f"{BASE}/current", json={"amps": 12})
    await eventually(lambda: SERIAL in rig.bridge.registry.store.lp_assignments())
    await rig.close()

    again = await make_rig(web_settings)
    point = again.point(SERIAL)
    assert point.state.config.controller == "manual" and point.state.requested_ca == 1200
    assert not point.state.enforce_heartbeat
    station = await again.station(1)
    await station.wait_for(lambda s: s.contactor and s.pwm == 20)  # 12 A
    # Back to the configured controller: the record is gone, so a restart keeps modbus.
    await http(again, "POST", f"{BASE}/controller", json={"controller": "modbus"})
    assert again.bridge.registry.store.records("controller/") == {}
    assert again.bridge.registry.store.records("manual/") == {}


async def test_cli_commands_and_their_refusals(make_rig, web_settings, tmp_path):
    rig = await make_rig(web_settings)
    station = await rig.station(1)
    done = await cli(rig, "current", SERIAL, "10", token="")
    assert done.returncode == 1
    assert "401: this action needs the admin token (pass it with --token TOKEN" in done.stderr
    done = await cli(rig, "current", SERIAL, "10")
    assert done.returncode == 1 and "switch its controller to manual first" in done.stderr
    done = await cli(rig, "controller", SERIAL, "manual")
    assert done.returncode == 0, done.stderr
    done = await cli(rig, "current", SERIAL, "10")
    assert done.returncode == 0 and "10 A, kept until changed" in done.stdout
    await station.wait_for(lambda s: s.contactor and s.pwm == 16)
    # Firmware while charging: refused at once, before anything is sent.
    image = tmp_path / "evse.bin"
    image.write_bytes(b"\x01" * 1000)
    done = await cli(rig, "firmware", SERIAL, str(image))
    assert done.returncode == 1 and "is charging" in done.stderr
    assert "sending" not in done.stdout and station.uploads == []
    image.write_bytes(b"")
    done = await cli(rig, "firmware", SERIAL, str(image))
    assert done.returncode == 1 and "the image must be 1..1048576 bytes" in done.stderr
    image.write_bytes(b"\x01" * 1000)
    done = await cli(rig, "firmware", "0" * 32, str(image))
    assert done.returncode == 1 and "404: no station " + "0" * 32 in done.stderr


async def test_a_move_drops_the_owners_current(make_rig, web_settings):
    rig = await make_rig(web_settings)
    await rig.station(1, VehicleConfig(plug_in_after=None))  # no vehicle: it may move
    await http(rig, "POST", f"{BASE}/controller", json={"controller": "manual"})
    await http(rig, "POST", f"{BASE}/current", json={"amps": 10})
    store = rig.bridge.registry.store
    assert store.records("manual/") == {f"manual/{SERIAL}": 1000}
    status, _ = await http(rig, "POST", f"{BASE}/move", json={"lp": 3})
    assert status == 200 and store.records("manual/") == {}
    point = rig.point(SERIAL)
    assert point.state.requested_ca == 0 and point.identity.lp == 3
    assert point.state.config.controller == "manual"  # the controller stays
