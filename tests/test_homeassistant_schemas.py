"""Every discovery message the service puts on the broker, validated by Home Assistant's own MQTT
discovery code (the homeassistant package in .venv-ha, made by ``make ha-venv``; it needs a newer
Python than the service, so it runs as a subprocess: tools/ha_validate_discovery.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import aiomqtt
import pytest
from conftest import eventually, station_config

from openwb_modbus_evse.interfaces import homeassistant_messages as m
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

ROOT = Path(__file__).resolve().parent.parent
HA_PYTHON = ROOT / ".venv-ha" / "bin" / "python"
VALIDATOR = ROOT / "tools" / "ha_validate_discovery.py"


def validate(payloads: list[dict]) -> list[dict]:
    """Home Assistant's verdict on each payload."""
    if not HA_PYTHON.exists():
        if os.environ.get("OPENWB_REQUIRE_TOOLS"):
            pytest.fail("Home Assistant's environment is missing: run make ha-venv")
        pytest.skip("Home Assistant's environment (.venv-ha) is missing: run make ha-venv")
    done = subprocess.run(
        [str(HA_PYTHON), str(VALIDATOR)],
        input=json.dumps(payloads),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_validator_rejects_what_home_assistant_rejects():
    station = m.Station(virtual_serial(1), "Garage", 32.0, False)
    good = m.discovery(station, "host-9091")
    wrong_unit = json.loads(json.dumps(good))
    wrong_unit["cmps"]["power"]["unit_of_measurement"] = "A"
    wrong_state_class = json.loads(json.dumps(good))
    wrong_state_class["cmps"]["energy"]["state_class"] = "measurement"
    no_device = {k: v for k, v in good.items() if k != "dev"}
    no_topic = json.loads(json.dumps(good))
    del no_topic["cmps"]["enable"]["command_topic"]
    verdicts = validate([good, wrong_unit, wrong_state_class, no_device, no_topic])
    assert [v["ok"] for v in verdicts] == [True, False, False, False, False]
    assert "power" in verdicts[1]["error"] and "energy" in verdicts[2]["error"]
    assert "command_topic" in verdicts[4]["error"]


async def test_every_discovery_message_on_the_broker_is_valid_for_home_assistant(
    settings, make_rig, broker, tmp_path
):
    switch = tmp_path / "switch.sh"
    switch.write_text("#!/bin/sh\nexit 0\n")
    switch.chmod(0o755)
    rig = await make_rig(
        broker.settings(
            settings,
            station=(
                station_config(1, 1, controller="homeassistant", name="Garage Süd"),
                station_config(2, 2, max_current=16.0, phase_switch_command=str(switch)),
            ),
        )
    )
    await eventually(lambda: rig.bridge.mqtt.connected)
    await rig.station(1, VehicleConfig(plug_in_after=0.0, reaction_s=0.05))
    configs: dict[str, dict] = {}
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe("homeassistant/device/+/config")

        async def read() -> None:
            async for message in client.messages:
                configs[message.topic.value] = json.loads(message.payload)

        reader = asyncio.create_task(read())
        try:
            await eventually(lambda: len(configs) == 2)
        finally:
            reader.cancel()
    payloads = list(configs.values())
    verdicts = validate(payloads)
    for payload, verdict in zip(payloads, verdicts, strict=True):
        name = payload["dev"]["name"]
        assert verdict["ok"], f"{name}: {verdict['error']}"
        assert verdict["warnings"] == [], f"{name}: {verdict['warnings']}"
        # Only default_entity_id is unknown to this (older) Home Assistant; nothing else is
        # dropped silently.
        dropped = {k: v["removed"] for k, v in verdict["entities"].items()}
        assert all(removed == ["default_entity_id"] for removed in dropped.values()), dropped
    by_name = {p["dev"]["name"]: p for p in payloads}
    lp2 = m.default_name(rig.point(virtual_serial(2)).identity.public_id)
    assert "phases" in by_name[lp2]["cmps"]
    assert by_name[lp2]["cmps"]["max_current"]["max"] == 16.0
    assert "phases" not in by_name["Garage Süd"]["cmps"]
