"""Configuration: TOML file + command-line overrides -> validated, frozen settings.

One table is the source of truth: the fields of :class:`Settings` (and of :class:`StationConfig`
for ``[[station]]`` entries), each with a :class:`KeyInfo` in its metadata. The checks, the
options of ``serve`` and docs/configuration.md (:func:`reference_markdown`) derive from it.

Every problem raises :class:`ConfigError` with one line that names the key, so start-up can stop
with that line and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import textwrap
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import click

from .evse.protocol import (
    NO_CALIBRATION,
    STATION_IDLE_TIMEOUT,
    Calibration,
    StationCalibration,
)
from .limits import Network, parse_networks

#: How many LPs one Modbus unit ID serves: an openWB has register blocks for LP1..LP9.
LPS_PER_UNIT = 9
#: How many charge points are served: nine per unit ID, on 27 unit IDs (LP10 is LP1 of the
#: second unit ID, ...). 27 unit IDs fit from any unit_id up to 221 within Modbus' 1..247, and
#: 243 charge points are more than one service's link, supply and controllers are built for.
MAX_LP = LPS_PER_UNIT * 27
ADMIN_TOKEN_MIN_LENGTH = 16  # guessing it over the LAN must be hopeless
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVERYONE = parse_networks(["0.0.0.0/0", "::/0"])
#: Who may drive a charge point (``controller``); every interface reads, only this one writes.
CONTROLLERS = ("modbus", "openwb-mqtt", "bridge-mqtt", "ocpp", "homeassistant", "manual")
MQTT_CONTROLLERS = ("openwb-mqtt", "bridge-mqtt", "homeassistant")  # need mqtt_host
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


# --- value checks: (key, value as read) -> the value kept; ConfigError(key, ...) if bad ----------

Check = Callable[[str, Any], Any]


def _integer(low: int, high: int) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(key, f"must be {low}..{high}, got {value}")
        return value

    return check


def _number(low: float, high: float) -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(key, f"must be at least {low:g} and at most {high:g}, got {value:g}")
        return float(value)

    return check


def _one_of(*choices: Any) -> Check:
    def check(key: str, value: Any) -> Any:
        if value not in choices or isinstance(value, bool):
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    return check


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


def _topic_prefix(key: str, value: Any) -> str:
    prefix = _str(key, value)
    if any(c in prefix for c in "+#\0") or prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigError(key, f"must hold no + or # and not begin or end with /, got {prefix!r}")
    return prefix


def _log_level(key: str, value: Any) -> str:
    return _one_of(*LOG_LEVELS)(key, _str(key, value).upper())


def check_admin_token(key: str, value: Any) -> str:
    """An admin token: empty (actions off) or long enough to be hopeless to guess."""
    token = _optional_str(key, value)
    if token and (len(token) < ADMIN_TOKEN_MIN_LENGTH or not token.isascii() or " " in token):
        raise ConfigError(
            key, f"must be at least {ADMIN_TOKEN_MIN_LENGTH} ASCII characters without spaces"
        )
    return token


def _supply_max_current(key: str, value: Any) -> float:
    amps = _number(0, 1000)(key, value)
    if 0 < amps < 6:
        raise ConfigError(key, f"must be 0 (no limit) or at least 6 A, got {amps:g}")
    return amps


def _failsafe_current(key: str, value: Any) -> float:
    amps = _number(0, 32)(key, value)
    if 0 < amps < 6:
        raise ConfigError(key, f"must be 0 (stop) or 6..32 A, got {amps:g}")
    return amps


def _ocpp_url(key: str, value: Any) -> str:
    url = _optional_str(key, value)
    if url and not re.fullmatch(r"wss?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ConfigError(key, f"must be ws://host:port/path or wss://..., got {url!r}")
    return url.rstrip("/")


def _ocpp_id(key: str, value: Any) -> str:
    ident = _str(key, value)
    # OCPP-J: the identity is the last path segment; CiString48 in the spec.
    if not re.fullmatch(r"[A-Za-z0-9._:*@+-]{1,48}", ident):
        raise ConfigError(key, f"must be 1..48 letters, digits or ._:*@+-, got {ident!r}")
    return ident


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


def _host_names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # the command line: comma-separated
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"must be a list of host names, got {value!r}")
    for name in value:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", name):
            raise ConfigError(key, f"{name!r} is not a host name")
    return tuple(name.lower() for name in value)


def _serial_number(key: str, value: Any) -> str:
    number = _str(key, value)
    if len(number) > 20 or not number.isascii():
        raise ConfigError(key, "must be at most 20 ASCII characters")
    return number


def _network(key: str, value: Any) -> Network:
    (network,) = _networks(key, [_str(key, value)])
    return network


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


def _mqtt_prefix(key: str, value: Any) -> str:
    prefix = _optional_str(key, value)
    if any(c in prefix for c in "+#\0") or (prefix and not prefix.endswith("/")):
        raise ConfigError(key, f"must end with / and hold no + or #, got {prefix!r}")
    return prefix


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


def _dim_command(key: str, value: Any) -> str:
    command = _optional_str(key, value)
    try:
        shlex.split(command)
    except ValueError as err:
        raise ConfigError(key, f"cannot split {command!r} into a command ({err})") from None
    return command


def _poll_interval(key: str, value: Any) -> float:
    number = _positive(key, value)
    if number >= STATION_IDLE_TIMEOUT:
        raise ConfigError(
            key,
            f"must be below {STATION_IDLE_TIMEOUT:g} s (stations drop the connection after "
            f"{STATION_IDLE_TIMEOUT:g} s without a request), got {number:g}",
        )
    return number


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


# --- the table ----------------------------------------------------------------------------------

_INFO = "openwb_modbus_evse.config"  # the metadata entry of a table field


@dataclass(frozen=True)
class KeyInfo:
    """What the table says about a key besides its field's name, type and default."""

    check: Check
    #: One line: the ``serve --help`` text of the key, and the start of its comment in the docs.
    help: str
    #: The rest of the comment in docs/configuration.md.
    more: str = ""
    #: Shown in the docs instead of the default (as written in TOML); the comment must then say
    #: what the default is.
    example: Any = None
    #: Heading of the group of keys that starts here, in the docs.
    section: str = ""
    #: The click type of the ``serve`` option; None: the field's type (lists: comma-separated).
    cli_type: click.ParamType | None = None


def key_info(
    check: Check,
    help: str,
    *,
    more: str = "",
    example: Any = None,
    section: str = "",
    cli_type: click.ParamType | None = None,
) -> dict[str, KeyInfo]:
    """A table field's ``metadata``: how its key is checked, explained and given as an option."""
    return {_INFO: KeyInfo(check, help, more, example, section, cli_type)}


class Key(NamedTuple):
    """One key of a table."""

    name: str
    type: Any  # the field's type
    default: Any  # MISSING: required
    info: KeyInfo


def keys(table: type) -> tuple[Key, ...]:
    """The keys of ``Settings`` or ``StationConfig`` in their order (``station`` is no key)."""
    types = get_type_hints(table)
    return tuple(
        Key(
            f.name,
            types[f.name],
            f.default if f.default_factory is MISSING else f.default_factory(),
            f.metadata[_INFO],
        )
        for f in fields(table)
        if _INFO in f.metadata
    )


@dataclass(frozen=True)
class StationConfig:
    """One ``[[station]]`` entry."""

    serial: str = field(
        metadata=key_info(
            _serial,
            "The station's ID: 32 hex digits (the log shows it). Required.",
            example="10BA23AB50534D53302E3120FF162332",
        )
    )
    lp: int | None = field(
        default=None,
        metadata=key_info(
            _integer(1, MAX_LP),
            f"1..{MAX_LP}: the charge point (LP) the station is served as.",
            more="Default: the LP remembered for the station, else the lowest free one.",
            example=1,
        ),
    )
    controller: str | None = field(
        default=None,
        metadata=key_info(
            _one_of(*CONTROLLERS),
            "Who drives this station (values as for the global controller).",
            more="Default: the global controller.",
            example="modbus",
        ),
    )
    mqtt_prefix: str | None = field(
        default=None,
        metadata=key_info(
            _mqtt_prefix,
            "Ends with /: the openWB MQTT tree is "
            "<mqtt_prefix>openWB/internal_chargepoint/<duo_num>.",
            more='Default: LP1 -> "" 0, LP2 -> "" 1; other LPs need one (see '
            "docs/openwb-primary.md).",
            example="",
        ),
    )
    duo_num: int | None = field(
        default=None,
        metadata=key_info(
            _integer(0, 1),
            "0 or 1: the number in the openWB MQTT tree (see mqtt_prefix).",
            more="Default: as for mqtt_prefix.",
            example=0,
        ),
    )
    name: str | None = field(
        default=None,
        metadata=key_info(
            _str, "For logs and metrics.", more='Default: "LP<n>".', example="garage"
        ),
    )
    serial_number: str | None = field(
        default=None,
        metadata=key_info(
            _serial_number,
            "The serial number controllers read (register serial_number): at most 20 ASCII "
            "characters.",
            more=(
                'Default: "EVSE-" and 12 hex digits made from serial with a random key kept in '
                "the state file: stable, unique, and telling nothing of the ID (which is the "
                "station's only credential)."
            ),
            example="WB-GARAGE",
        ),
    )
    max_current: float = field(
        default=32.0,
        metadata=key_info(_number(6, 32), "A, 6..32: the installation's limit."),
    )
    failsafe_current: float = field(
        default=0.0,
        metadata=key_info(
            _failsafe_current,
            "A offered while its controller's heartbeat is lapsed: 0 = stop, or 6..32.",
            more="Never more than the controller last asked for; under every other cap (cable, "
            "station, supply).",
        ),
    )
    cable: str = field(
        default="socket",
        metadata=key_info(
            _one_of("socket", "tethered"),
            '"socket": no cable, no current; "tethered": fixed cable, max_current applies.',
        ),
    )
    phases: int = field(
        default=3,
        metadata=key_info(_one_of(1, 3), "How the station is wired: 1 or 3 phases."),
    )
    phase_switch_command: str | None = field(
        default=None,
        metadata=key_info(
            _str,
            "External command that switches a phase relay; called with the target (1 or 3) "
            "appended.",
            more="Without it, the register phase_target accepts only the wired phase count. "
            "Default: none.",
            example="/usr/local/bin/phase-relay --set",
        ),
    )
    calibration: StationCalibration = field(
        default=NO_CALIBRATION,
        metadata=key_info(
            _calibration,
            "Raw sensor calibration, value = max(0, (raw - offset) * slope / divider), as "
            "[offset, slope, divider] per value: u1..u3 voltages in mV, i1..i3 currents in mA.",
            more="Default: identity for each.",
            example={"u1": [0, 1, 1], "i1": [0, 1, 1]},
        ),
    )
    ocpp_url: str | None = field(
        default=None,
        metadata=key_info(
            _ocpp_url,
            "This station's OCPP central system (as the global ocpp_url); empty = none.",
            more="Default: the global ocpp_url.",
            example="ws://csms.example:9000/ocpp",
        ),
    )
    ocpp_id: str | None = field(
        default=None,
        metadata=key_info(
            _ocpp_id,
            "The station's OCPP identity: it connects to <ocpp_url>/<ocpp_id>.",
            more="Default: the station's name (LP<n> without one).",
            example="garage",
        ),
    )
    ocpp_password: str | None = field(
        default=None,
        metadata=key_info(
            _str,
            "OCPP Security Profile 1/2: the basic-auth password (user: ocpp_id).",
            more="Default: none (Security Profile 0, or 2 with TLS alone).",
            example="secret-of-garage",
        ),
    )
    address: Network | None = field(
        default=None,
        metadata=key_info(
            _network,
            "The only address or network the station may connect from, e.g. its DHCP reservation.",
            more="A connection with its serial from elsewhere is refused. Default: any.",
            example="192.168.1.0/24",
        ),
    )


@dataclass(frozen=True)
class Settings:
    """Everything ``serve`` runs with."""

    evse_host: str = field(
        default="::",
        metadata=key_info(
            _str,
            "Address the stations connect to.",
            more='"::" takes IPv6 and IPv4 stations.',
            section="Dehne-EVSE stations connect here",
        ),
    )
    evse_port: int = field(
        default=9091, metadata=key_info(_integer(0, 65535), "Port the stations connect to.")
    )
    evse_max_connections: int = field(
        default=128,
        metadata=key_info(_integer(1, 100_000), "Station connections open at most."),
    )
    evse_max_per_address: int = field(
        default=8,
        metadata=key_info(
            _integer(1, 100_000),
            "Station connections open at most from one address.",
            more="For IPv6, one /64 counts as one address.",
        ),
    )
    poll_interval: float = field(
        default=5.0,
        metadata=key_info(
            _poll_interval,
            f"Seconds between polls of a station, below {STATION_IDLE_TIMEOUT:g}.",
            more=f"Stations drop the connection after {STATION_IDLE_TIMEOUT:g} s without a "
            "request.",
        ),
    )
    modbus_host: str = field(
        default="0.0.0.0",
        metadata=key_info(
            _str,
            "Modbus TCP listen address.",
            section="Modbus TCP server for controllers (evcc, Home Assistant, mbpoll)",
        ),
    )
    modbus_port: int = field(
        default=1502, metadata=key_info(_integer(0, 65535), "Modbus TCP port, 0 = off.")
    )
    unit_id: int = field(
        default=1,
        metadata=key_info(
            _integer(0, 247),
            "Modbus unit ID of LP1..9, 0 = answer any.",
            more="LP10..18 are served at the next unit ID, and so on; 0 serves LP1..9 only.",
        ),
    )
    modbus_max_connections: int = field(
        default=64, metadata=key_info(_integer(1, 100_000), "Modbus connections open at most.")
    )
    modbus_max_per_address: int = field(
        default=8,
        metadata=key_info(
            _integer(1, 100_000), "Modbus connections open at most from one address."
        ),
    )
    modbus_idle_timeout: float = field(
        default=300.0,
        metadata=key_info(
            _positive,
            "Seconds before an idle Modbus connection is closed.",
            more="Clients reconnect on their next poll.",
        ),
    )
    modbus_allow: tuple[Network, ...] = field(
        default=EVERYONE,
        metadata=key_info(
            _networks,
            "Addresses/networks that may connect to Modbus (a,b,...).",
            more="IPv4 and IPv6; the default is everyone.",
        ),
    )
    modbus_write_allow: tuple[Network, ...] = field(
        default=EVERYONE,
        metadata=key_info(
            _networks,
            "Addresses/networks that may write over Modbus (a,b,...).",
            more="Others read only and get exception 1 for a write.",
        ),
    )
    state_db: str = field(
        default_factory=default_state_db,
        metadata=key_info(
            _str,
            "SQLite state file (energy, LP numbers).",
            more="Created if missing. Default: $XDG_STATE_HOME/openwb-modbus-evse/state.sqlite3 "
            "(~/.local/state/...); the example is the path the systemd unit uses.",
            example="/var/lib/openwb-modbus-evse/state.sqlite3",
            section="State",
        ),
    )
    energy_save_interval: float = field(
        default=5.0,
        metadata=key_info(
            _positive,
            "Seconds between saves of the energy counters.",
            more="What a crash can lose at most.",
        ),
    )
    heartbeat_timeout: float = field(
        default=80.0,
        metadata=key_info(
            _positive,
            "Seconds without a Modbus request from a client that may write before charging stops.",
            section="Charging safety",
        ),
    )
    stop_timeout: float = field(
        default=6.0,
        metadata=key_info(
            _number(0.5, 60), "Seconds to wait for the vehicle before opening under load."
        ),
    )
    phase_switch_pause: float = field(
        default=5.0,
        metadata=key_info(_number(0, 600), "Seconds between a phase switch and resuming."),
    )
    phase_switch_timeout: float = field(
        default=30.0,
        metadata=key_info(_positive, "Seconds the phase-switch command may take."),
    )
    stop_charging_on_shutdown: bool = field(
        default=True,
        metadata=key_info(_bool, "Stop charging safely on shutdown (true/false)."),
    )
    contactor_min_off: float = field(
        default=60.0,
        metadata=key_info(
            _number(0, 3600),
            "Minimum seconds between contactor opening and closing.",
            more="0 = off.",
        ),
    )
    supply_max_current: float = field(
        default=0.0,
        metadata=key_info(
            _supply_max_current,
            "A per phase all stations share; 0 = no limit.",
            more="What all stations together are offered stays within it (one shared supply).",
        ),
    )
    dim_command: str = field(
        default="",
        metadata=key_info(
            _dim_command,
            "Command that reads the grid operator's dimming contact; empty = none.",
            more="Run without a shell every dim_poll_interval s: exit code 0 = dimmed (to "
            "dim_limit) unless it prints 0, off or false; 1 = not dimmed; any other code or "
            "output, a timeout or a command that cannot run counts as dimmed. The dimming "
            "limit can also be set over MQTT (<mqtt_topic_prefix>set/supply_limit) and the "
            "HTTP API; see docs/dimming.md.",
            example="/usr/local/bin/read-dim-contact",
            section="Grid operator dimming, §14a EnWG (see docs/dimming.md)",
        ),
    )
    dim_poll_interval: float = field(
        default=5.0,
        metadata=key_info(
            _number(0.05, 3600),
            "Seconds between runs of dim_command (also the time it may take).",
        ),
    )
    dim_limit: float = field(
        default=0.0,
        metadata=key_info(
            _number(0, 1000),
            "A per phase all stations share while dim_command says dimmed; 0 = the §14a floor.",
            more="Never below the §14a floor: 4.2 kW for each station that wants current "
            "(6.6 A per phase on three phases, 18.6 A on one).",
        ),
    )
    metrics_host: str = field(
        default="0.0.0.0",
        metadata=key_info(
            _str,
            "HTTP listen address (/metrics, status page, actions).",
            section="HTTP server: Prometheus /metrics, the status page, its JSON API and actions",
        ),
    )
    metrics_port: int = field(
        default=9502,
        metadata=key_info(
            _integer(0, 65535), "HTTP port (/metrics, status page, actions), 0 = off."
        ),
    )
    http_hosts: tuple[str, ...] = field(
        default=(),
        metadata=key_info(
            _host_names,
            "Comma-separated host names the HTTP server answers to, besides IP addresses, "
            "localhost and this machine's name.",
            more="A request with any other Host header is refused (421): a page on another "
            "site cannot read the status or metrics through DNS rebinding. In this file also "
            "a list.",
        ),
    )
    admin_token: str = field(
        default="",
        metadata=key_info(
            check_admin_token,
            "Bearer token for the HTTP actions; empty = actions off.",
            more=f"At least {ADMIN_TOKEN_MIN_LENGTH} characters, e.g. from `openssl rand -hex "
            "16`. The CLI's move, forget and firmware commands send it (--token).",
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=key_info(_log_level, "DEBUG, INFO, WARNING or ERROR.", section="Logging"),
    )
    controller: str = field(
        default="modbus",
        metadata=key_info(
            _one_of(*CONTROLLERS),
            "Who drives the charge points without their own controller.",
            more='"modbus", "openwb-mqtt" (an openWB primary over MQTT), "bridge-mqtt" (the '
            'Rust bridge\'s messages, see bridge_topics) or "homeassistant" (the entities of '
            'ha_discovery, see docs/home-assistant.md), which need mqtt_host; "ocpp" (an OCPP '
            'central system, needs ocpp_url); "manual" (the owner, from the status page or the '
            "CLI, with admin_token; no heartbeat: the choice stays until changed). Every "
            "interface reads; writes from the others are refused. The status page can switch a "
            "station's controller at runtime (kept in state_db).",
            section="Controllers and MQTT (see docs/openwb-primary.md)",
            cli_type=click.Choice(CONTROLLERS),
        ),
    )
    mqtt_host: str = field(
        default="",
        metadata=key_info(_optional_str, "MQTT broker address; empty = MQTT off."),
    )
    mqtt_port: int = field(default=1883, metadata=key_info(_integer(1, 65535), "MQTT broker port."))
    mqtt_username: str = field(
        default="", metadata=key_info(_optional_str, "MQTT user name; empty = none.")
    )
    mqtt_password: str = field(default="", metadata=key_info(_optional_str, "MQTT password."))
    mqtt_ca_file: str = field(
        default="",
        metadata=key_info(
            _readable_file, "CA certificate file: TLS to the broker; empty = plain TCP."
        ),
    )
    mqtt_topic_prefix: str = field(
        default="openwb-modbus-evse/",
        metadata=key_info(
            _mqtt_prefix,
            "Ends with /: the service's own topics, e.g. <prefix>set/supply_limit; empty = off.",
            more="See docs/dimming.md.",
        ),
    )
    mqtt_heartbeat_timeout: float = field(
        default=80.0,
        metadata=key_info(
            _positive,
            "Seconds without the openWB primary's heartbeat before charging stops.",
            more="Its heartbeat is its global_data message.",
        ),
    )
    bridge_topics: str = field(
        default="",
        metadata=key_info(
            _bridge_topics,
            "Rust-bridge messages: PUBLISH,SUBSCRIBE topics; empty = off.",
            more="The JSON messages of the Rust dehneevse-mqtt-bridge (see docs/migration.md); "
            f'its defaults are "{",".join(RUST_BRIDGE_TOPICS)}".',
        ),
    )
    bridge_heartbeat_timeout: float = field(
        default=80.0,
        metadata=key_info(
            _positive,
            "Seconds without a Rust-bridge request before its stations stop charging.",
        ),
    )
    ocpp_url: str = field(
        default="",
        metadata=key_info(
            _ocpp_url,
            "OCPP 1.6J central system, ws://host:port/path or wss://...; empty = OCPP off.",
            more="Every station with an ocpp_url is a charge point of it, connected to "
            '<ocpp_url>/<ocpp_id>; only stations with controller "ocpp" take its commands, the '
            "others only report (see docs/ocpp.md).",
            section="OCPP 1.6J (see docs/ocpp.md)",
        ),
    )
    ocpp_ca_file: str = field(
        default="",
        metadata=key_info(
            _readable_file,
            "CA certificate file for wss:// central systems; empty = the system's CAs.",
        ),
    )
    ocpp_id_tag: str = field(
        default="openwb-modbus-evse",
        metadata=key_info(
            _ocpp_id,
            "The id tag of transactions started by plugging in (the station has no RFID).",
        ),
    )
    ocpp_offline_start: bool = field(
        default=False,
        metadata=key_info(
            _bool,
            'An "ocpp" station may start charging while the central system is unreachable.',
            more="Its transaction is queued and sent when the central system is back. Off: "
            "charging waits for the central system's answer (OCPP's default).",
        ),
    )
    ocpp_reconnect_max: float = field(
        default=60.0,
        metadata=key_info(
            _number(1, 3600),
            "Seconds: the longest wait before reconnecting to the central system.",
            more="The wait doubles from 4 s up to this, each a random part of it (jitter), "
            "so a restarted central system is not hit by every station at once.",
        ),
    )
    ha_discovery: bool = field(
        default=True,
        metadata=key_info(
            _bool,
            "Announce every station to Home Assistant over MQTT (true/false).",
            more="Needs mqtt_host: each station appears as a device with its sensors and controls "
            '(MQTT discovery); the controls act for stations whose controller is "homeassistant".',
            section="Home Assistant (see docs/home-assistant.md)",
        ),
    )
    ha_discovery_prefix: str = field(
        default="homeassistant",
        metadata=key_info(
            _topic_prefix,
            "Home Assistant's MQTT discovery prefix.",
            more="As set in Home Assistant's MQTT integration; its status is <prefix>/status.",
        ),
    )
    unknown_stations: str = field(
        default="assign",
        metadata=key_info(
            _one_of("assign", "hold"),
            "New stations: assign (the lowest free LP) or hold (not served).",
            more="A held station is polled and kept safe (PWM 100 %, contactor open). New: "
            "neither in [[station]] nor in known_stations.",
            section="Stations without a [[station]] entry",
        ),
    )
    known_stations: tuple[str, ...] = field(
        default=(),
        metadata=key_info(
            _serials,
            "Comma-separated serials served even with unknown_stations=hold.",
            more="In this file also a list; a serial is 32 hex digits.",
        ),
    )
    lp_remember_after: float = field(
        default=60.0,
        metadata=key_info(
            _number(0, 86400),
            "Seconds a new station must stay before its LP is saved.",
            more="It must send valid data meanwhile; its energy counter is saved with the LP. "
            "If it leaves sooner, the LP is free again.",
        ),
    )
    station: tuple[StationConfig, ...] = ()  # [[station]] entries (their keys: StationConfig)

    def station_by_serial(self, serial: str) -> StationConfig | None:
        """The ``[[station]]`` entry of this serial, if any."""
        return next((s for s in self.station if s.serial == serial), None)

    def controller_of(self, serial: str) -> str:
        """Which interface drives the station (its own ``controller``, else the global one)."""
        station = self.station_by_serial(serial)
        return (station.controller if station else None) or self.controller

    def ocpp_url_of(self, serial: str) -> str:
        """The station's OCPP central system ("": none)."""
        station = self.station_by_serial(serial)
        url = station.ocpp_url if station is not None else None
        return self.ocpp_url if url is None else url

    def is_known(self, serial: str) -> bool:
        """A station the user named: in ``[[station]]`` or in ``known_stations``."""
        return serial in self.known_stations or self.station_by_serial(serial) is not None

    @property
    def dim_sources(self) -> tuple[str, ...]:
        """Where a grid operator's dimming limit can come from with these settings (the MQTT
        topic, the HTTP API, the command); none: no dimming, no shared supply for it."""
        found = []
        if self.mqtt_host and self.mqtt_topic_prefix:
            found.append("mqtt")
        if self.metrics_port and self.admin_token:
            found.append("http")
        if self.dim_command:
            found.append("command")
        return tuple(found)

    @property
    def supply_shared(self) -> bool:
        """The stations share a limited supply: fixed (supply_max_current) or dimmable."""
        return bool(self.supply_max_current or self.dim_sources)

    @property
    def bridge_topic_pair(self) -> tuple[str, str] | None:
        """(publish topic, subscribe topic) of the Rust-bridge messages; None when off."""
        if not self.bridge_topics:
            return None
        publish, subscribe = self.bridge_topics.split(",")
        return publish, subscribe


def _station(index: int, raw: Any) -> StationConfig:
    prefix = f"station[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, "must be a table ([[station]])")
    table = keys(StationConfig)
    known = {key.name for key in table}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{prefix}.{name}", "unknown key")
    values: dict[str, Any] = {}
    for key in table:
        if key.name in raw:
            values[key.name] = key.info.check(f"{prefix}.{key.name}", raw[key.name])
        elif key.default is MISSING:
            raise ConfigError(f"{prefix}.{key.name}", "is required")
    return StationConfig(**values)


def build(values: Mapping[str, Any]) -> Settings:
    """Validated settings from a mapping shaped like the TOML file."""
    checks = {key.name: key.info.check for key in keys(Settings)}
    settings: dict[str, Any] = {}
    for name, value in values.items():
        if name == "station":
            if not isinstance(value, list):
                raise ConfigError("station", "must be an array of tables ([[station]])")
            stations = tuple(_station(i, raw) for i, raw in enumerate(value))
            _check_unique(stations)
            settings["station"] = stations
        elif name in checks:
            settings[name] = checks[name](name, value)
        else:
            raise ConfigError(name, "unknown key")
    result = Settings(**settings)
    _check_mqtt(result)
    _check_ocpp_ids(result)
    return result


def _check_ocpp_ids(settings: Settings) -> None:
    """Two stations cannot be one charge point of the same central system."""
    seen: dict[tuple[str, str], int] = {}
    for i, st in enumerate(settings.station):
        url = settings.ocpp_url_of(st.serial)
        ident = st.ocpp_id or st.name
        if not url or ident is None:
            continue
        if (url, ident) in seen:
            raise ConfigError(
                f"station[{i}].ocpp_id",
                f"{ident!r} at {url} is already station[{seen[url, ident]}] (set ocpp_id)",
            )
        seen[url, ident] = i


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
    if not settings.ha_discovery:
        if settings.controller == "homeassistant":
            raise ConfigError("controller", "'homeassistant' needs ha_discovery = true")
        for i, st in enumerate(settings.station):
            if st.controller == "homeassistant":
                raise ConfigError(f"station[{i}].controller", "'homeassistant' needs ha_discovery")
    if not settings.bridge_topics:
        if settings.controller == "bridge-mqtt":
            raise ConfigError("controller", "'bridge-mqtt' needs bridge_topics")
        for i, st in enumerate(settings.station):
            if st.controller == "bridge-mqtt":
                raise ConfigError(f"station[{i}].controller", "'bridge-mqtt' needs bridge_topics")
    if settings.controller == "ocpp" and not settings.ocpp_url:
        raise ConfigError("controller", "'ocpp' needs ocpp_url")
    for i, st in enumerate(settings.station):
        if settings.controller_of(st.serial) == "ocpp" and not settings.ocpp_url_of(st.serial):
            raise ConfigError(f"station[{i}].controller", "'ocpp' needs ocpp_url")
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
    A dim_command that cannot run counts as dimmed all the time.
    """
    commands = [
        (f"station[{index}].phase_switch_command", station.phase_switch_command)
        for index, station in enumerate(settings.station)
    ]
    commands.append(("dim_command", settings.dim_command))
    found = []
    for key, command in commands:
        if not command:
            continue
        try:
            program = shlex.split(command)[0]
        except (ValueError, IndexError):
            found.append(f"{key}: cannot split {command!r} into a command")
            continue
        path = shutil.which(program) if os.sep not in program else program
        if path is None or not os.path.exists(path):
            found.append(f"{key}: {program} does not exist")
        elif os.path.isdir(path) or not os.access(path, os.X_OK):
            found.append(f"{key}: {program} is not executable")
    return found


# --- docs/configuration.md ----------------------------------------------------------------------

_REFERENCE_INTRO = """\
# Configuration reference

<!-- Generated from the settings table in openwb_modbus_evse/config.py by `make docs`
     (openwb-modbus-evse config-reference); edit the table, not this file. -->

`openwb-modbus-evse serve --config FILE` reads a TOML file. Every key outside `[[station]]` is
also a `serve` option (`poll_interval` is `--poll-interval`); the command line wins.
`serve --check-config` validates a file and exits; it also warns (and `serve` logs at start-up)
when a station's `phase_switch_command` does not exist or is not executable.

The example below has every key. A key shows its default, unless its comment says what the
default is: then the value is an example. No station is configured by default: the
`[[station]]` entry is an example of one. A station without an entry gets the lowest free LP
and the defaults of the station keys.
"""


def _toml(value: Any) -> str:
    """``value`` as written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, Network):
        return _toml(str(value))
    if isinstance(value, list | tuple):
        return f"[{', '.join(map(_toml, value))}]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{name} = {_toml(v)}" for name, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def _annotated(table: type) -> list[str]:
    """Every key of the table with its comment and its default (or example)."""
    lines = []
    for key in keys(table):
        if key.info.section:
            lines += ["", f"# --- {key.info.section} ---"]
        comment = f"{key.info.help} {key.info.more}".strip()
        lines += textwrap.wrap(
            comment, 100, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
        )
        shown = key.default if key.info.example is None else key.info.example
        lines.append(f"{key.name} = {_toml(shown)}")
    return lines


def reference_markdown() -> str:
    """docs/configuration.md: an example file with every key, its comment and its default."""
    lines = [
        "# /etc/openwb-modbus-evse.toml",
        *_annotated(Settings),
        "",
        "# --- One entry per station to pin to an LP or to describe ---",
        "[[station]]",
        *_annotated(StationConfig),
    ]
    return _REFERENCE_INTRO + "\n```toml\n" + "\n".join(lines) + "\n```\n"
