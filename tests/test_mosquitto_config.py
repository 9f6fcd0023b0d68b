"""``mosquitto-config``: the printed configuration runs in the real mosquitto and carries the
trees to the primaries; the mount-point warning follows the installed mosquitto's version."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import Broker, free_port, require_tool, station_config
from openwb_primary import Primary

from openwb_modbus_evse.config import Settings
from openwb_modbus_evse.interfaces.mosquitto_config import (
    MOUNT_POINTS_FIXED,
    build,
    installed_version,
)

CLI = [sys.executable, "-m", "openwb_modbus_evse", "mosquitto-config"]


def test_two_charge_points_need_one_plain_listener():
    text, warnings = build(Settings(mqtt_host="127.0.0.1"), {})
    assert "listener 1883\n" in text and "allow_anonymous true" in text
    assert "mount_point" not in text and warnings == []
    assert "openWB/internal_chargepoint/0  (LP1)" in text
    assert "openWB/internal_chargepoint/1  (LP2)" in text


def test_the_command_prints_the_config_and_warns_about_missing_addresses(tmp_path):
    require_tool("mosquitto")
    serial = station_config(3, lp=3).serial
    config = tmp_path / "c.toml"
    config.write_text(
        f'mqtt_host = "127.0.0.1"\n[[station]]\nserial = "{serial}"\nlp = 3\n'
        'mqtt_prefix = "lp3/"\ncontroller = "openwb-mqtt"\n'
    )
    done = subprocess.run(
        [*CLI, "--config", str(config), "--address", "192.168.1.50"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "listener 1883 192.168.1.50\n" in done.stdout
    assert "listener 1883 ADDRESS-FOR-lp3/\nmount_point lp3/" in done.stdout
    assert "listener 1883 127.0.0.1\n" in done.stdout  # the service's
    assert "--address lp3/=IP" in done.stderr
    bad = subprocess.run([*CLI, "--config", str(tmp_path / "none.toml")], capture_output=True)
    assert bad.returncode == 2 and b"cannot read" in bad.stderr


@pytest.mark.slow
async def test_the_mount_point_layout_in_the_real_mosquitto(tmp_path, settings, make_rig):
    """Three addresses on loopback: the service's, duo 0/1's and lp3/'s."""
    service_port, primary_port = free_port(), free_port()
    stations = (station_config(3, lp=3, mqtt_prefix="lp3/", controller="openwb-mqtt"),)
    mqtt = replace(settings, mqtt_host="127.0.0.1", mqtt_port=service_port, station=stations)
    addresses = {"": "127.0.0.2", "lp3/": "127.0.0.3"}
    text, warnings = build(mqtt, addresses, port=primary_port)
    assert f"listener {primary_port} 127.0.0.3\nmount_point lp3/" in text
    broker = Broker(tmp_path, config=(text, service_port))
    await broker.start()
    try:
        await make_rig(mqtt)
        plain = await Primary(primary_port, host="127.0.0.2").read(1.0)
        assert plain["fault_state"] == 2 and "no station is LP1" in plain["fault_str"]

        version = installed_version()
        assert version is not None
        mounted = await Primary(primary_port, host="127.0.0.3").read(1.0)
        if version < MOUNT_POINTS_FIXED:
            # The bug the warning is about, as it is: topics arrive with the prefix.
            assert any("2.0.12" in w for w in warnings), warnings
            assert "fault_state" not in mounted
            assert all(topic.startswith("lp3/openWB/") for topic in mounted), mounted
            assert mounted
        else:
            assert warnings == []
            assert mounted["fault_state"] == 2 and "not connected" in mounted["fault_str"]
    finally:
        broker.stop()
