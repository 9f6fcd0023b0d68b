"""Make a Home Assistant config dir for trying the service's MQTT discovery with a real ``hass``.

    .venv-ha/bin/python tools/ha_demo_config.py DIR --broker 127.0.0.1 --port 1883
    .venv-ha/bin/hass -c DIR --skip-pip
    make demo DEMO_OPTIONS="--mqtt-host 127.0.0.1 --mqtt-port 1883"

The MQTT integration is set up as a config entry (as the UI would), mqtt_statestream publishes
every entity's state to ``hass_states/<domain>/<object id>/state`` on the same broker (so a
script can read what Home Assistant shows), and two automations let a script use the entities
the way evcc's homeassistant charger does (number.set_value, switch.turn_on/turn_off): publish a
value to ``hass_test/max_current/<entity id>`` or ``hass_test/enable/<entity id>`` (ON/OFF).
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

CONFIGURATION = """\
homeassistant:
  name: openwb-modbus-evse test
  unit_system: metric
  time_zone: UTC
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: info
mqtt_statestream:
  base_topic: hass_states
  publish_attributes: false
  publish_timestamps: false
automation:
  - alias: set max current
    triggers:
      - trigger: mqtt
        topic: hass_test/max_current/#
    actions:
      - action: number.set_value
        target:
          entity_id: "{{ trigger.topic.split('/')[-1] }}"
        data:
          value: "{{ trigger.payload }}"
  - alias: enable
    triggers:
      - trigger: mqtt
        topic: hass_test/enable/#
    actions:
      - action: "switch.turn_{{ 'on' if trigger.payload == 'ON' else 'off' }}"
        target:
          entity_id: "{{ trigger.topic.split('/')[-1] }}"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--broker", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    (args.dir / ".storage").mkdir(parents=True, exist_ok=True)
    (args.dir / "configuration.yaml").write_text(CONFIGURATION)
    now = datetime.now(UTC).isoformat()
    entry = {
        "entry_id": uuid.uuid4().hex,
        "version": 1,
        "minor_version": 2,
        "domain": "mqtt",
        "title": args.broker,
        "data": {"broker": args.broker, "port": args.port},
        "options": {"discovery": True, "discovery_prefix": "homeassistant"},
        "pref_disable_new_entities": False,
        "pref_disable_polling": False,
        "source": "user",
        "unique_id": None,
        "disabled_by": None,
        "created_at": now,
        "modified_at": now,
        "discovery_keys": {},
        "subentries": [],
    }
    entries = {
        "version": 1,
        "minor_version": 5,
        "key": "core.config_entries",
        "data": {"entries": [entry]},
    }
    (args.dir / ".storage" / "core.config_entries").write_text(json.dumps(entries, indent=2))


if __name__ == "__main__":
    main()
