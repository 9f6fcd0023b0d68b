"""Configuration: TOML file + command-line overrides -> validated, frozen settings.

Every problem raises :class:`ConfigError` with one line that names the key, so start-up can stop
with that line and no traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .evse.protocol import (
    NO_CALIBRATION,
    STATION_IDLE_TIMEOUT,
    Calibration,
    StationCalibration,
)
from .limits import Network, parse_networks

#: How many charge points are served (LP1..LP9, one openWB register block each).
MAX_LP = 9
ADMIN_TOKEN_MIN_LENGTH = 16  # guessing it over the LAN must be hopeless
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVERYONE = parse_networks(["0.0.0.0/0", "::/0"])
#: Who may drive a charge point (``controller``); every interface reads, only this one writes.
CONTROLLERS = ("modbus", "openwb-mqtt", "bridge-mqtt")
MQTT_CONTROLLERS = ("openwb-mqtt", "bridge-mqtt")  # need mqtt_host
#: The Rust dehneevse-mqtt-bridge's default topics (publish, subscribe).
RUST_BRIDGE_TOPICS = ("from_dehneEVSE", "to_dehneEVSE")
_CALIBRATION_KEYS = ("u1", "u2", "u3", "i1", "i2", "i3")


class ConfigError(Exception):
    """A configuration problem; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def default_state_db() -> str:
    """Where the state file lives unless configured: the user's XDG state directory."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "openwb-modbus-evse" / "state.sqlite3")


@dataclass(frozen=True)
class StationConfig:
    """One ``[[station]]`` entry."""

    serial: str
    lp: int | None = None  # None: the remembered LP, else the lowest free one
    controller: str | None = None  # None: the global ``controller``
    mqtt_prefix: str | None = None  # None (and no duo_num): the default openWB tree of LP1/LP2
    duo_num: int | None = None
    name: str | None = None
    serial_number: str | None = None
    max_current: float = 32.0
    cable: str = "socket"
    phases: int = 3
    phase_switch_command: str | None = None
    calibration: StationCalibration = NO_CALIBRATION
    # The only source address (or network) the station may connect from; None: any.
    address: Network | None = None


@dataclass(frozen=True)
class Settings:
    """Everything ``serve`` runs with."""

    evse_host: str = "::"
    evse_port: int = 9091
    evse_max_connections: int = 128
    evse_max_per_address: int = 8
    poll_interval: float = 5.0
    modbus_host: str = "0.0.0.0"
    modbus_port: int = 1502
    unit_id: int = 1
    modbus_max_connections: int = 64
    modbus_max_per_address: int = 8
    modbus_idle_timeout: float = 300.0
    modbus_allow: tuple[Network, ...] = EVERYONE
    modbus_write_allow: tuple[Network, ...] = EVERYONE
    state_db: str = field(default_factory=default_state_db)
    heartbeat_timeout: float = 80.0
    stop_timeout: float = 6.0
    phase_switch_pause: float = 5.0
    phase_switch_timeout: float = 30.0
    stop_charging_on_shutdown: bool = True
    energy_save_interval: float = 5.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9502
    admin_token: str = ""  # bearer token for the HTTP actions; empty: actions off
    supply_max_current: float = 0.0  # A per phase shared by all stations; 0: no limit
    log_level: str = "INFO"
    mqtt_host: str = ""
    mqtt_port: int = 1883
    mqtt_username: str = ""
    mqtt_password: str = ""
    mqtt_ca_file: str = ""
    mqtt_heartbeat_timeout: float = 80.0
    controller: str = "modbus"
    unknown_stations: str = "assign"
    known_stations: tuple[str, ...] = ()
    lp_remember_after: float = 60.0
    contactor_min_off: float = 60.0
    bridge_topics: str = ""  # "<publish>,<subscribe>": the Rust bridge's messages; "" = off
    bridge_heartbeat_timeout: float = 80.0
    station: tuple[StationConfig, ...] = ()

    def station_by_serial(self, serial: str) -> StationConfig | None:
        """The ``[[station]]`` entry of this serial, if any."""
        return next((s for s in self.station if s.serial == serial), None)

    def controller_of(self, serial: str) -> str:
        """Which interface drives the station (its own ``controller``, else the global one)."""
        station = self.station_by_serial(serial)
        return (station.controller if station else None) or self.controller

    def is_known(self, serial: str) -> bool:
        """A station the user named: in ``[[station]]`` or in ``known_stations``."""
        return serial in self.known_stations or self.station_by_serial(serial) is not None

    @property
    def bridge_topic_pair(self) -> tuple[str, str] | None:
        """(publish topic, subscribe topic) of the Rust-bridge messages; None when off."""
        if not self.bridge_topics:
            return None
        publish, subscribe = self.bridge_topics.split(",")
        return publish, subscribe


# --- value checks ----------------------------------------------------------------------------


def _int(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be {low}..{high}, got {value}")
    return value


def _number(key: str, value: Any, low: float, high: float, *, below: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if value < low or value > high or (below and value >= high):
        bound = f"below {high:g}" if below else f"at most {high:g}"
        raise ConfigError(key, f"must be at least {low:g} and {bound}, got {value:g}")
    return float(value)


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if value <= 0:
        raise ConfigError(key, f"must be above 0, got {value:g}")
    return float(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, got {value!r}")
    return value


def _optional_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    return value


def _readable_file(key: str, value: Any) -> str:
    path = _optional_str(key, value)
    if path:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(key, f"cannot read {path} ({exc.strerror})") from exc
    return path


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices or isinstance(value, bool):
        raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _admin_token(key: str, value: Any) -> str:
    token = _optional_str(key, value)
    if token and (len(token) < ADMIN_TOKEN_MIN_LENGTH or not token.isascii() or " " in token):
        raise ConfigError(
            key, f"must be at least {ADMIN_TOKEN_MIN_LENGTH} ASCII characters without spaces"
        )
    return token


def _supply_max_current(key: str, value: Any) -> float:
    amps = _number(key, value, 0, 1000)
    if 0 < amps < 6:
        raise ConfigError(key, f"must be 0 (no limit) or at least 6 A, got {amps:g}")
    return amps


def _serial(key: str, value: Any) -> str:
    serial = _str(key, value).upper()
    if not re.fullmatch(r"[0-9A-F]{32}", serial):
        raise ConfigError(key, f"must be 32 hex digits, got {value!r}")
    return serial


def _serials(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # the command line: comma-separated
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of serials, got {value!r}")
    return tuple(_serial(key, item) for item in value)


def _network(key: str, value: Any) -> Network:
    (network,) = _networks(key, [_str(key, value)])
    return network


def _bridge_topics(key: str, value: Any) -> str:
    if not _optional_str(key, value):
        return value
    topics = value.split(",")
    if len(topics) != 2 or not all(topics):
        raise ConfigError(key, f'must be "<publish topic>,<subscribe topic>", got {value!r}')
    for topic in topics:
        if any(c in topic for c in "+#\0") or len(topic.encode()) > 65535:
            raise ConfigError(key, f"topics must hold no + or # (no wildcards), got {topic!r}")
    if topics[0] == topics[1]:
        # Its own answers would come back as requests: two topics keep it free of loops.
        raise ConfigError(key, f"publish and subscribe topics must differ, got {value!r}")
    return value


def _poll_interval(key: str, value: Any) -> float:
    number = _positive(key, value)
    if number >= STATION_IDLE_TIMEOUT:
        raise ConfigError(
            key,
            f"must be below {STATION_IDLE_TIMEOUT:g} s (stations drop the connection after "
            f"{STATION_IDLE_TIMEOUT:g} s without a request), got {number:g}",
        )
    return number


def _networks(key: str, value: Any) -> tuple[Network, ...]:
    """A list of addresses / networks (TOML), or the same comma-separated (command line)."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"must be a list of addresses or networks, got {value!r}")
    try:
        return parse_networks(value)
    except ValueError as err:
        raise ConfigError(key, str(err)) from None


_CHECKS: dict[str, Any] = {
    "evse_host": _str,
    "evse_port": lambda k, v: _int(k, v, 0, 65535),
    "evse_max_connections": lambda k, v: _int(k, v, 1, 100_000),
    "evse_max_per_address": lambda k, v: _int(k, v, 1, 100_000),
    "poll_interval": _poll_interval,
    "modbus_host": _str,
    "modbus_port": lambda k, v: _int(k, v, 0, 65535),
    "unit_id": lambda k, v: _int(k, v, 0, 247),
    "modbus_max_connections": lambda k, v: _int(k, v, 1, 100_000),
    "modbus_max_per_address": lambda k, v: _int(k, v, 1, 100_000),
    "modbus_idle_timeout": _positive,
    "modbus_allow": _networks,
    "modbus_write_allow": _networks,
    "state_db": _str,
    "heartbeat_timeout": _positive,
    "stop_timeout": lambda k, v: _number(k, v, 0.5, 60),
    "phase_switch_pause": lambda k, v: _number(k, v, 0, 600),
    "phase_switch_timeout": _positive,
    "stop_charging_on_shutdown": _bool,
    "energy_save_interval": _positive,
    "metrics_host": _str,
    "metrics_port": lambda k, v: _int(k, v, 0, 65535),
    "admin_token": _admin_token,
    "supply_max_current": _supply_max_current,
    "log_level": lambda k, v: _choice(k, _str(k, v).upper(), LOG_LEVELS),
    "unknown_stations": lambda k, v: _choice(k, v, ("assign", "hold")),
    "known_stations": _serials,
    "lp_remember_after": lambda k, v: _number(k, v, 0, 86400),
    "contactor_min_off": lambda k, v: _number(k, v, 0, 3600),
    "mqtt_host": _optional_str,
    "mqtt_port": lambda k, v: _int(k, v, 1, 65535),
    "mqtt_username": _optional_str,
    "mqtt_password": _optional_str,
    "mqtt_ca_file": _readable_file,
    "mqtt_heartbeat_timeout": _positive,
    "controller": lambda k, v: _choice(k, v, CONTROLLERS),
    "bridge_topics": _bridge_topics,
    "bridge_heartbeat_timeout": _positive,
}


def _calibration(key: str, value: Any) -> StationCalibration:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a table with keys {', '.join(_CALIBRATION_KEYS)}")
    triples = {}
    for name, triple in value.items():
        if name not in _CALIBRATION_KEYS:
            raise ConfigError(f"{key}.{name}", f"unknown key; use {', '.join(_CALIBRATION_KEYS)}")
        if (
            not isinstance(triple, list)
            or len(triple) != 3
            or any(isinstance(x, bool) or not isinstance(x, int) for x in triple)
        ):
            raise ConfigError(f"{key}.{name}", f"must be [offset, slope, divider], got {triple!r}")
        if triple[2] <= 0:
            raise ConfigError(f"{key}.{name}", f"divider must be above 0, got {triple[2]}")
        triples[name] = Calibration(*triple)
    get = lambda n: triples.get(n, Calibration())  # noqa: E731
    return StationCalibration(
        voltages=(get("u1"), get("u2"), get("u3")), currents=(get("i1"), get("i2"), get("i3"))
    )


def _station(index: int, raw: Any) -> StationConfig:
    prefix = f"station[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, "must be a table ([[station]])")
    known = {f.name for f in fields(StationConfig)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", "unknown key")
    if "serial" not in raw:
        raise ConfigError(f"{prefix}.serial", "is required")
    values: dict[str, Any] = {"serial": _serial(f"{prefix}.serial", raw["serial"])}
    if "lp" in raw:
        values["lp"] = _int(f"{prefix}.lp", raw["lp"], 1, MAX_LP)
    if "controller" in raw:
        values["controller"] = _choice(f"{prefix}.controller", raw["controller"], CONTROLLERS)
    if "mqtt_prefix" in raw:
        mqtt_prefix = _optional_str(f"{prefix}.mqtt_prefix", raw["mqtt_prefix"])
        if any(c in mqtt_prefix for c in "+#\0") or (mqtt_prefix and not mqtt_prefix.endswith("/")):
            raise ConfigError(
                f"{prefix}.mqtt_prefix", f"must end with / and hold no + or #, got {mqtt_prefix!r}"
            )
        values["mqtt_prefix"] = mqtt_prefix
    if "duo_num" in raw:
        values["duo_num"] = _int(f"{prefix}.duo_num", raw["duo_num"], 0, 1)
    if "name" in raw:
        values["name"] = _str(f"{prefix}.name", raw["name"])
    if "serial_number" in raw:
        number = _str(f"{prefix}.serial_number", raw["serial_number"])
        if len(number) > 20 or not number.isascii():
            raise ConfigError(f"{prefix}.serial_number", "must be at most 20 ASCII characters")
        values["serial_number"] = number
    if "max_current" in raw:
        values["max_current"] = _number(f"{prefix}.max_current", raw["max_current"], 6, 32)
    if "cable" in raw:
        values["cable"] = _choice(f"{prefix}.cable", raw["cable"], ("socket", "tethered"))
    if "phases" in raw:
        values["phases"] = _choice(f"{prefix}.phases", raw["phases"], (1, 3))
    if "phase_switch_command" in raw:
        values["phase_switch_command"] = _str(
            f"{prefix}.phase_switch_command", raw["phase_switch_command"]
        )
    if "calibration" in raw:
        values["calibration"] = _calibration(f"{prefix}.calibration", raw["calibration"])
    if "address" in raw:
        values["address"] = _network(f"{prefix}.address", raw["address"])
    return StationConfig(**values)


def build(values: Mapping[str, Any]) -> Settings:
    """Validated settings from a mapping shaped like the TOML file."""
    settings: dict[str, Any] = {}
    for key, value in values.items():
        if key == "station":
            if not isinstance(value, list):
                raise ConfigError("station", "must be an array of tables ([[station]])")
            stations = tuple(_station(i, raw) for i, raw in enumerate(value))
            _check_unique(stations)
            settings["station"] = stations
        elif key in _CHECKS:
            settings[key] = _CHECKS[key](key, value)
        else:
            raise ConfigError(key, "unknown key")
    result = Settings(**settings)
    _check_mqtt(result)
    return result


def _check_mqtt(settings: Settings) -> None:
    """MQTT controllers need a broker; two stations cannot share an openWB tree."""
    if not settings.mqtt_host:
        if settings.controller in MQTT_CONTROLLERS:
            raise ConfigError("controller", f"{settings.controller!r} needs mqtt_host")
        for i, st in enumerate(settings.station):
            if st.controller in MQTT_CONTROLLERS:
                raise ConfigError(f"station[{i}].controller", f"{st.controller!r} needs mqtt_host")
        if settings.bridge_topics:
            raise ConfigError("bridge_topics", "needs mqtt_host (the MQTT broker)")
    if not settings.bridge_topics:
        if settings.controller == "bridge-mqtt":
            raise ConfigError("controller", "'bridge-mqtt' needs bridge_topics")
        for i, st in enumerate(settings.station):
            if st.controller == "bridge-mqtt":
                raise ConfigError(f"station[{i}].controller", "'bridge-mqtt' needs bridge_topics")
    trees: dict[tuple[str, int], int] = {}
    for i, st in enumerate(settings.station):
        tree = station_tree(st)
        if tree is None:
            continue
        if tree in trees:
            raise ConfigError(
                f"station[{i}].duo_num",
                f"{tree[0]}openWB/internal_chargepoint/{tree[1]} is already station[{trees[tree]}]",
            )
        trees[tree] = i


def station_tree(station: StationConfig) -> tuple[str, int] | None:
    """The openWB MQTT tree (prefix, duo_num) configured for the station, None if not set."""
    if station.mqtt_prefix is None and station.duo_num is None:
        return None
    return station.mqtt_prefix or "", station.duo_num or 0


def _check_unique(stations: tuple[StationConfig, ...]) -> None:
    seen_lp: dict[int, int] = {}
    seen_serial: dict[str, int] = {}
    for i, st in enumerate(stations):
        if st.lp is not None and st.lp in seen_lp:
            raise ConfigError(
                f"station[{i}].lp", f"LP{st.lp} is already taken by station[{seen_lp[st.lp]}]"
            )
        if st.serial in seen_serial:
            raise ConfigError(
                f"station[{i}].serial", f"already configured as station[{seen_serial[st.serial]}]"
            )
        seen_serial[st.serial] = i
        if st.lp is not None:
            seen_lp[st.lp] = i


def load(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from the TOML file at ``path`` (if any) with ``overrides`` (None = not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the config file ({exc.strerror})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML ({exc})") from exc
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    publish = given.pop("bridge_publish_topic", None)
    subscribe = given.pop("bridge_subscribe_topic", None)
    values.update(given)
    if publish is not None or subscribe is not None:
        # Either half alone keeps the other from the file, else the Rust bridge's default.
        current = values.get("bridge_topics") or ",".join(RUST_BRIDGE_TOPICS)
        pub, _, sub = str(current).partition(",")
        values["bridge_topics"] = f"{publish or pub},{subscribe or sub}"
    return build(values)


def warnings(settings: Settings) -> list[str]:
    """What is valid but will not work as meant, one line each naming the key.

    A phase-switch command that does not exist or may not be run fails only when a controller
    first switches phases, perhaps months later: say so at ``--check-config`` and at start-up.
    """
    found = []
    for index, station in enumerate(settings.station):
        key = f"station[{index}].phase_switch_command"
        if station.phase_switch_command is None:
            continue
        try:
            program = shlex.split(station.phase_switch_command)[0]
        except (ValueError, IndexError):
            found.append(f"{key}: cannot split {station.phase_switch_command!r} into a command")
            continue
        path = shutil.which(program) if os.sep not in program else program
        if path is None or not os.path.exists(path):
            found.append(f"{key}: {program} does not exist")
        elif os.path.isdir(path) or not os.access(path, os.X_OK):
            found.append(f"{key}: {program} is not executable")
    return found
