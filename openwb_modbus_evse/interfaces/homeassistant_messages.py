"""Home Assistant MQTT discovery: the messages, pure (no I/O, no clock).

Each served station is one Home Assistant *device*, announced by one retained device-based
discovery message (Home Assistant >= 2024.11) on ``<prefix>/device/<device id>/config``. Its
device id, unique ids and object ids derive from the station's public id only (never its ID,
the station's only credential, as anyone on the broker reads them), so they stay the same
across restarts and LP moves. Every entity reads the station's one retained JSON state topic;
the controls write to the station's own command topics. Sensors are available while the service
is online *and* the station sends fresh data (the view's rule); the controls while the service is
online (their state is Home Assistant's own choice, never stale).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from .. import chargepoint as cp
from ..evse.protocol import Pilot
from ..view import Freshness, Shown

TOPIC_ROOT = "openwb-modbus-evse"
ONLINE, OFFLINE = "online", "offline"
ON, OFF = "ON", "OFF"
PRESS = "PRESS"
#: Seconds of control-pilot interruption the button asks for (the vehicle wakes up again).
CP_INTERRUPTION_S = 4
#: Command payloads are a number or a word; anything longer is refused unread.
MAX_COMMAND_BYTES = 32
#: The charge status sensor's states: IEC 61851 pilot states (D is shown as C: charging).
STATUSES = ("A", "B", "C", "E", "F")
_VERSION = version("openwb-modbus-evse")
# Pilot states as the charge status sensor shows them.
_STATUS = {
    Pilot.A_12V: "A",
    Pilot.B_9V: "B",
    Pilot.C_6V: "C",
    Pilot.D_3V: "C",
    Pilot.FAULT: "E",
    Pilot.MINUS_12V: "F",
    Pilot.UNKNOWN: "F",
}


@dataclass(frozen=True)
class Station:
    """What the discovery message of a station says (all fixed while the service runs)."""

    ident: str  # the station's public id (Identity.public_id), in every topic and id
    name: str  # the device name: the configured station name, else "Dehne EVSE <last 8 hex>"
    max_current_a: float
    can_switch_phases: bool


@dataclass(frozen=True)
class Choice:
    """What Home Assistant chose for a station: the max current (centiamps) and enable."""

    max_ca: int
    enabled: bool = False

    @property
    def requested_ca(self) -> int:
        """The current this asks of the control path."""
        return self.max_ca if self.enabled else 0


def device_id(ident: str) -> str:
    """The device's id in the discovery topic and its identifier."""
    return f"openwb_modbus_evse_{ident.lower()}"


def object_prefix(ident: str) -> str:
    """What every entity id of the station starts with: ``evse_<last 8 hex digits>``."""
    return f"evse_{ident[-8:].lower()}"


def default_name(ident: str) -> str:
    """The device name of a station without a configured name."""
    return f"Dehne EVSE {ident[-8:].upper()}"


def topic_safe(text: str) -> str:
    """``text`` usable as one MQTT topic level (no wildcards, no separators)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"


def discovery_topic(prefix: str, ident: str) -> str:
    """Where the station's device discovery message is retained."""
    return f"{prefix}/device/{device_id(ident)}/config"


def status_topic(prefix: str) -> str:
    """Where Home Assistant announces itself (birth ``online``, last will ``offline``)."""
    return f"{prefix}/status"


def service_availability_topic(service_id: str) -> str:
    """The service's own online/offline (its last will says offline)."""
    return f"{TOPIC_ROOT}/service/{topic_safe(service_id)}/availability"


def state_topic(ident: str) -> str:
    """The station's retained JSON state."""
    return f"{TOPIC_ROOT}/{ident}/state"


def availability_topic(service_id: str, ident: str) -> str:
    """The station's online (fresh data) or offline, as the service that serves it says (so a
    service can clean up what it left behind: see :func:`availability_filter`)."""
    return f"{TOPIC_ROOT}/service/{topic_safe(service_id)}/station/{ident}/availability"


def availability_filter(service_id: str) -> str:
    """Every station availability topic of the service."""
    return availability_topic(service_id, "+")


def availability_ident(topic: str) -> str:
    """The station's public id in a station availability topic."""
    return topic.split("/")[-2]


def command_topic(ident: str, key: str) -> str:
    """Where Home Assistant sends the station's ``key`` control."""
    return f"{TOPIC_ROOT}/{ident}/set/{key}"


COMMAND_FILTER = f"{TOPIC_ROOT}/+/set/+"
CONTROLS = ("max_current", "enable", "phases", "pilot_interruption")


def parse_command_topic(topic: str) -> tuple[str, str] | None:
    """(ident, control) of a command topic, or None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[2] != "set" or parts[3] not in CONTROLS:
        return None
    return parts[1], parts[3]


# --- discovery --------------------------------------------------------------------------------


def _sensor(
    key: str, name: str, unit: str | None = None, device_class: str | None = None, **extra: Any
) -> tuple[str, str, dict[str, Any]]:
    config: dict[str, Any] = {"name": name}
    if device_class:
        config["device_class"] = device_class
    if unit:
        config["unit_of_measurement"] = unit
        config["state_class"] = "measurement"
    config.update(extra)
    return key, "sensor", config


def _entities(station: Station) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, platform, the entity's own options) of every entity of the station."""
    entities = [
        _sensor("power", "Power", "W", "power"),
        _sensor(
            "energy",
            "Energy",
            "kWh",
            "energy",
            state_class="total_increasing",
            suggested_display_precision=3,
        ),
        *(_sensor(f"current_l{n}", f"Current L{n}", "A", "current") for n in (1, 2, 3)),
        *(_sensor(f"voltage_l{n}", f"Voltage L{n}", "V", "voltage") for n in (1, 2, 3)),
        _sensor("offered_current", "Offered current", "A", "current"),
        _sensor("charge_status", "Charge status", device_class="enum", options=list(STATUSES)),
        _sensor("fault", "Fault", entity_category="diagnostic", icon="mdi:alert-circle-outline"),
        _sensor("firmware", "Firmware", entity_category="diagnostic", icon="mdi:chip"),
        _sensor("rssi", "Wi-Fi signal", "dBm", "signal_strength", entity_category="diagnostic"),
        ("plugged", "binary_sensor", {"name": "Plugged in", "device_class": "plug"}),
        ("charging", "binary_sensor", {"name": "Charging", "device_class": "battery_charging"}),
        (
            "max_current",
            "number",
            {
                "name": "Max current",
                "device_class": "current",
                "unit_of_measurement": "A",
                "min": cp.MIN_CURRENT_CA / 100,
                "max": max(6.0, min(cp.MAX_CURRENT_CA / 100, station.max_current_a)),
                "step": 1,
                "mode": "box",
            },
        ),
        ("enable", "switch", {"name": "Charging enabled", "icon": "mdi:ev-station"}),
        (
            "pilot_interruption",
            "button",
            {"name": "Interrupt pilot", "icon": "mdi:restart", "payload_press": PRESS},
        ),
    ]
    if station.can_switch_phases:
        entities.append(("phases", "select", {"name": "Phases", "options": ["1", "3"]}))
    return entities


def discovery(station: Station, service_id: str) -> dict[str, Any]:
    """The station's device discovery message."""
    ident, objects = station.ident, object_prefix(station.ident)
    service = {"topic": service_availability_topic(service_id)}
    components: dict[str, dict[str, Any]] = {}
    for key, platform, own in _entities(station):
        config: dict[str, Any] = {
            "p": platform,
            "unique_id": f"{device_id(ident)}_{key}",
            # Home Assistant >= 2025.10 takes the entity id from default_entity_id (and from
            # 2026.4 on only from there); older ones from object_id.
            "default_entity_id": f"{platform}.{objects}_{key}",
            "object_id": f"{objects}_{key}",
            **own,
        }
        if platform != "button":
            config["state_topic"] = state_topic(ident)
            config["value_template"] = "{{ value_json." + key + " }}"
        if key in CONTROLS:
            config["command_topic"] = command_topic(ident, key)
            # The controls show Home Assistant's own choice: valid while the service runs.
            config["availability"] = [service]
        else:
            config["availability"] = [service, {"topic": availability_topic(service_id, ident)}]
            config["availability_mode"] = "all"
        components[key] = config
    return {
        "dev": {
            "identifiers": [device_id(ident)],
            "name": station.name,
            "manufacturer": "Dehne",
            "model": "EVSE",
            "serial_number": ident,
        },
        "o": {"name": "openwb-modbus-evse", "sw": _VERSION},
        "cmps": components,
        "qos": 0,
    }


# --- state ------------------------------------------------------------------------------------


def _r(value: float, digits: int = 2) -> float:
    return round(value, digits)


def charge_status(shown: Shown, interrupting: bool) -> str:
    """A, B, C, E or F: the pilot state (a pilot interruption shows the plug state before it)."""
    data = shown.data
    if data is None:
        return "F"  # no station: EVSE not available
    if interrupting:  # the pilot is held at -12 V on purpose: not a fault
        return "B" if shown.plugged else "A"
    return _STATUS[data.pilot]


def state(
    shown: Shown,
    *,
    choice: Choice,
    energy_kwh: float,
    phases: int,
    firmware: int | None,
    interrupting: bool,
) -> dict[str, Any]:
    """The station's JSON state, as the view shows it (``energy_kwh`` never goes backwards)."""
    data = shown.data
    values: dict[str, Any] = {
        "power": _r(shown.power_w, 1),
        "energy": _r(energy_kwh, 3),
        "offered_current": _r(shown.offered_a),
        "charge_status": charge_status(shown, interrupting),
        "plugged": ON if shown.plugged else OFF,
        "charging": ON if shown.charging else OFF,
        "fault": shown.fault_text or "OK",
        "firmware": str(firmware) if firmware is not None else None,
        "rssi": data.rssi_dbm if data is not None else None,
        "max_current": choice.max_ca / 100,
        "enable": ON if choice.enabled else OFF,
        "phases": str(phases),
    }
    for n in (1, 2, 3):
        values[f"current_l{n}"] = _r(shown.currents_a[n - 1])
        voltage = shown.voltages_v[n - 1]
        values[f"voltage_l{n}"] = _r(voltage, 1) if voltage is not None else None
    return values


def availability(shown: Shown) -> str:
    """online while the station sends fresh, valid data."""
    return ONLINE if shown.freshness is Freshness.FRESH else OFFLINE


def encode(value: Any) -> bytes:
    """Compact JSON."""
    return json.dumps(value, separators=(",", ":")).encode()


# --- commands (pure parsing) ------------------------------------------------------------------


def _bad(message: str) -> cp.Refused:
    return cp.Refused(cp.RefusalKind.BAD_VALUE, message)


def _text(payload: bytes) -> str:
    if len(payload) > MAX_COMMAND_BYTES:
        raise _bad(f"payload of {len(payload)} bytes; at most {MAX_COMMAND_BYTES}")
    try:
        return payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _bad(f"not ASCII: {payload[:20]!r}") from None


def parse_max_current(payload: bytes) -> int:
    """Amperes (6..32, as Home Assistant's number sends them: "16" or "16.0") -> centiamps."""
    text = _text(payload)
    try:
        amps = float(text)
    except ValueError:
        raise _bad(f"max_current must be a number of amperes, got {text!r}") from None
    if not math.isfinite(amps) or not 6 <= amps <= 32:
        raise _bad(f"max_current must be 6..32 A, got {text}")
    return round(amps * 100)


def parse_switch(payload: bytes) -> bool:
    """ON or OFF."""
    text = _text(payload)
    if text not in (ON, OFF):
        raise _bad(f"enable must be {ON} or {OFF}, got {text!r}")
    return text == ON


def parse_phases(payload: bytes) -> int:
    """1 or 3."""
    text = _text(payload)
    if text not in ("1", "3"):
        raise _bad(f"phases must be 1 or 3, got {text!r}")
    return int(text)


def parse_press(payload: bytes) -> None:
    """The button's PRESS."""
    text = _text(payload)
    if text != PRESS:
        raise _bad(f"pilot_interruption takes {PRESS}, got {text!r}")
