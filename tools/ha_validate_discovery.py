"""Validate MQTT device discovery messages with Home Assistant's own code (run in .venv-ha).

Reads a JSON list of discovery payloads on stdin; for each: expands the abbreviations, checks the
device payload (DEVICE_DISCOVERY_SCHEMA, the origin schema), then every component with its
platform's DISCOVERY_SCHEMA, as Home Assistant's MQTT integration does when the message arrives,
and a sensor's or number's unit and state class against Home Assistant's tables for its device
class (what the entity checks once it runs). Prints a JSON list, one entry per payload:
{"ok": true, "entities": {...}, "warnings": [...]} (what Home Assistant logged meanwhile) or
{"ok": false, "error": "..."}. Exit code 0 unless the input is unreadable.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from typing import Any


def validate(payload: dict[str, Any]) -> dict[str, Any]:
    import voluptuous as vol
    from homeassistant.components.mqtt import discovery
    from homeassistant.components.mqtt.schemas import (
        DEVICE_DISCOVERY_SCHEMA,
        MQTT_ORIGIN_INFO_SCHEMA,
    )

    try:
        discovery._replace_all_abbreviations(payload)
        DEVICE_DISCOVERY_SCHEMA(payload)
        MQTT_ORIGIN_INFO_SCHEMA(payload["origin"])
        entities = {}
        for component_id, raw in payload["components"].items():
            config = dict(raw)
            platform = config.pop("platform")
            config["device"] = payload["device"]
            config["origin"] = payload["origin"]
            discovery._merge_common_device_options(config, payload)
            module = importlib.import_module(f"homeassistant.components.mqtt.{platform}")
            try:
                checked = module.DISCOVERY_SCHEMA(config)
            except vol.Invalid as err:
                return {"ok": False, "error": f"{component_id} ({platform}): {err}"}
            problem = _device_class_problem(platform, checked)
            if problem:
                return {"ok": False, "error": f"{component_id} ({platform}): {problem}"}
            entities[component_id] = {
                "platform": platform,
                "keys": sorted(str(k) for k in checked),
                "removed": sorted(set(map(str, config)) - set(map(str, checked))),
            }
    except vol.Invalid as err:
        return {"ok": False, "error": str(err)}
    return {"ok": True, "entities": entities}


def _device_class_problem(platform: str, config: dict[str, Any]) -> str | None:
    """Unit and state class against Home Assistant's tables for the device class."""
    from homeassistant.components import sensor
    from homeassistant.components.number import const as number

    device_class = config.get("device_class")
    if platform not in ("sensor", "number") or device_class is None:
        return None
    module = sensor if platform == "sensor" else number
    units = module.DEVICE_CLASS_UNITS.get(device_class)
    unit = config.get("unit_of_measurement")
    if units is not None and unit not in units:
        return f"unit {unit!r} is not one of {sorted(map(str, units))} for {device_class}"
    if platform == "sensor" and "state_class" in config:
        classes = sensor.DEVICE_CLASS_STATE_CLASSES.get(device_class)
        if classes is not None and config["state_class"] not in classes:
            return f"state class {config['state_class']} is not allowed for {device_class}"
    if device_class == "enum" and not config.get("options"):
        return "an enum sensor needs options"
    return None


async def validate_all(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate inside a (bare) Home Assistant instance: its template checks need one."""
    import tempfile

    from homeassistant.core import HomeAssistant
    from homeassistant.helpers import frame

    with tempfile.TemporaryDirectory() as config_dir:
        hass = HomeAssistant(config_dir)
        frame.async_setup(hass)
        logged: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                logged.append(record.getMessage())

        handler = Collect(logging.WARNING)
        logging.getLogger("homeassistant").addHandler(handler)
        try:
            results = []
            for payload in payloads:
                logged.clear()
                result = validate(payload)
                result["warnings"] = list(logged)
                results.append(result)
            return results
        finally:
            await hass.async_stop(force=True)


def main() -> int:
    import asyncio

    payloads = json.load(sys.stdin)
    json.dump(asyncio.run(validate_all(payloads)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
