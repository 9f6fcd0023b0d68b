"""The openWB software 2.x secondary API over MQTT: what an openWB primary drives.

The primary (charge-point type "secondary openWB") publishes retained JSON to
``<prefix>openWB/set/internal_chargepoint/...`` and reads the retained values under
``<prefix>openWB/internal_chargepoint/<duo>/get/``. Each charge point has one such tree: LP1 and
LP2 are duo 0 and 1 without a prefix (one broker looks like an openWB Duo); ``mqtt_prefix`` and
``duo_num`` in ``[[station]]`` place a station anywhere else (with a mosquitto mount point).

Commands go through the control path like Modbus writes; a bad one is logged once (until it
changes), counted and ignored. What the primary reads is the view's (view.py), as on Modbus.
Every set topic is cleared after handling (an empty retained publish), and one-shot commands
(phase-switch trigger, pilot interruption) are only carried out when they arrive live, never
from a retained replay after a reconnect.

The primary's heartbeat (``global_data``) counts when it arrives live with a timestamp other than
the previous one, timed by arrival on our monotonic clock (the two clocks need not agree, and
either may step); a retained replay only sets the baseline. Each prefix has its own heartbeat,
applied to the charge points of that prefix that this interface controls. It starts lapsed:
nothing charges on a stale retained set_current until a live heartbeat arrives.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from .. import chargepoint as cp
from ..config import Settings, station_tree
from ..control import OPENWB_MQTT, Command, Control, Kind
from ..evse.link import printable
from ..heartbeat import Heartbeat
from ..mqtt.connection import Message, MqttConnection
from ..ratelimit import RateLimit
from ..registry import Registry
from ..view import FAULT_ERROR, FAULT_WARNING, Viewable, show
from .rerender import ViewTimers

log = logging.getLogger(__name__)

_VERSION = f"openwb-modbus-evse {version('openwb-modbus-evse')}"
# Log lines caused by what peers publish: a burst, then one every 10 s (refusals stay counted).
LOG_BURST, LOG_PER_SECOND = 30, 0.1
# What the primary reads once the service is gone without a clean stop.
_WILL = {
    "fault_state": FAULT_ERROR,
    "fault_str": "openwb-modbus-evse is not running: it stopped without a clean shutdown or "
    "lost its connection to the MQTT broker",
    "power": 0.0,
    "charge_state": False,
}
# Commands that act once: a retained copy of them is an old command, not a new one.
_ONE_SHOT = ("trigger_phase_switch", "cp_interruption_duration")


@dataclass(frozen=True)
class Tree:
    """One charge point's topics: ``<prefix>openWB/internal_chargepoint/<duo>/``.

    A configured tree belongs to a station (``serial``), a default one to whatever is ``lp``.
    """

    prefix: str
    duo: int
    serial: str | None = None
    lp: int | None = None

    @property
    def name(self) -> str:
        return f"{self.prefix}openWB/internal_chargepoint/{self.duo}"

    @property
    def get_base(self) -> str:
        return f"{self.name}/get/"

    @property
    def set_base(self) -> str:
        return f"{self.prefix}openWB/set/internal_chargepoint/{self.duo}/data/"


def global_topic(prefix: str, name: str) -> str:
    """``global_data`` or ``last_tag``: one per broker tree, not per charge point."""
    return f"{prefix}openWB/set/internal_chargepoint/{name}"


def trees_of(settings: Settings) -> list[Tree]:
    """Configured trees, then the defaults LP1 -> duo 0 and LP2 -> duo 1 where still free."""
    trees = []
    for station in settings.station:
        where = station_tree(station)
        if where is not None:
            trees.append(Tree(*where, serial=station.serial))
    taken = {(t.prefix, t.duo) for t in trees}
    elsewhere = {s.lp for s in settings.station if station_tree(s) is not None}
    for lp, duo in ((1, 0), (2, 1)):
        if ("", duo) not in taken and lp not in elsewhere:
            trees.append(Tree("", duo, lp=lp))
    return trees


# --- what the primary reads (pure) ------------------------------------------------------------


def _r(value: float) -> float:
    return round(value, 2)


def get_values(point: Viewable | None, tree: Tree, now: float, refused: str = "") -> dict[str, Any]:
    """Every get/ topic of the tree and its JSON value, as the view shows the charge point;
    ``refused``: why the primary's last command was refused (a warning until one goes through)."""
    if point is None:
        what = f"LP{tree.lp}" if tree.lp else f"station {tree.serial}"
        return {
            **dict.fromkeys(("power", "imported", "exported", "evse_current"), 0.0),
            **{key: [0.0, 0.0, 0.0] for key in ("currents", "voltages", "powers")},
            "phases_in_use": 0,
            "plug_state": False,
            "charge_state": False,
            "max_evse_current": 0.0,
            "serial_number": "",
            "version": _VERSION,
            **_fault(FAULT_ERROR, f"openwb-modbus-evse: no station is {what} yet"),
        }
    shown = show(point, now)
    fault, text = shown.fault, shown.fault_text
    controller = point.state.config.controller
    if fault < FAULT_WARNING and controller != OPENWB_MQTT:
        fault = FAULT_WARNING
        text = f"controlled over {controller}, not by this openWB: commands are refused"
    elif fault < FAULT_WARNING and refused:
        fault, text = FAULT_WARNING, f"command refused: {refused}"
    return {
        "power": _r(shown.power_w),
        "imported": _r(shown.energy_wh),
        "exported": 0.0,
        "currents": [_r(a) for a in shown.currents_a],
        "voltages": [_r(v or 0.0) for v in shown.voltages_v],
        "powers": [_r(w) for w in shown.phase_powers_w],
        "phases_in_use": shown.phases_in_use,
        "plug_state": shown.plugged,
        "charge_state": shown.charging,
        "evse_current": _r(shown.offered_a),
        "max_evse_current": _r(shown.max_current_a),
        "serial_number": point.identity.serial_number,
        "version": _VERSION,
        **_fault(fault, f"openwb-modbus-evse: {text}" if text else ""),
    }


def _fault(level: int, text: str) -> dict[str, Any]:
    return {"fault_state": level, "fault_str": text}


# --- what the primary sends (pure parsing) ----------------------------------------------------


def _bad(message: str) -> cp.Refused:
    return cp.Refused(cp.RefusalKind.BAD_VALUE, message)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_set_current(value: Any) -> int:
    """Amperes (0 or 6..32, int or float) -> centiamps."""
    if not _number(value):
        raise _bad(f"set_current must be a number of amperes, got {value!r}")
    if value < 0:
        raise _bad(f"set_current {value} A: discharging is not supported")
    if value != 0 and not 6 <= value <= 32:
        raise _bad(f"set_current must be 0 or 6..32 A, got {value}")
    return round(value * 100)


def _int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an integer, got {value!r}")
    return value


def _phases(value: Any) -> Command | None:
    return Command(Kind.PHASES, _int("phases_to_use", value))


def _trigger(value: Any) -> Command | None:
    if not isinstance(value, bool):
        raise _bad(f"trigger_phase_switch must be true or false, got {value!r}")
    return Command(Kind.PHASE_SWITCH) if value else None


def _interrupt(value: Any) -> Command | None:
    seconds = _int("cp_interruption_duration", value)
    if seconds < 0:
        raise _bad(f"cp_interruption_duration must be 0 or more seconds, got {seconds}")
    return Command(Kind.CP_INTERRUPTION, seconds) if seconds else None


#: The command each ``.../<duo>/data/<name>`` is (None: nothing to do).
COMMANDS: dict[str, Callable[[Any], Command | None]] = {
    "set_current": lambda value: Command(Kind.CURRENT, parse_set_current(value)),
    "phases_to_use": _phases,
    "trigger_phase_switch": _trigger,
    "cp_interruption_duration": _interrupt,
}


def parse_heartbeat(value: Any) -> float:
    """``global_data`` -> the primary's timestamp."""
    if not isinstance(value, dict) or not _number(value.get("heartbeat")):
        raise _bad(f'global_data must be {{"heartbeat": <unix time>, ...}}, got {value!r}')
    return float(value["heartbeat"])


class PrimaryHeartbeat:
    """The heartbeat of the primary that publishes under one prefix."""

    def __init__(self, prefix: str, clock: Heartbeat) -> None:
        self.prefix = prefix
        self.clock = clock
        self.last_timestamp: float | None = None
        self.parent_ip: str | None = None

    def received(self, timestamp: float, retained: bool) -> bool:
        """A heartbeat arrived; True if it counts as fresh (and refreshed the clock).

        Fresh: it arrived live and its timestamp differs from the last one. Not "newer": a
        single far-future timestamp (from any client of the broker) would make every real one
        look old, and a primary whose clock steps back would stop its stations until it caught
        up. A retained replay only sets the baseline."""
        fresh = not retained and timestamp != self.last_timestamp
        self.last_timestamp = timestamp
        if fresh:
            self.clock.refresh()
        return fresh


# --- the interface ----------------------------------------------------------------------------


class OpenWbSecondary:
    """Publishes every tree, takes the primary's commands, keeps one heartbeat per prefix."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        control: Control,
        connection: MqttConnection,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.control = control
        self.mqtt = connection
        self.clock = clock
        self.trees = trees_of(settings)
        self.heartbeats = {
            prefix: PrimaryHeartbeat(
                prefix,
                # Lapsed until the first live heartbeat: a retained set_current may be hours old.
                control.add_heartbeat(
                    OPENWB_MQTT,
                    settings.mqtt_heartbeat_timeout,
                    scope=prefix,
                    what=f"openWB heartbeat on {global_topic(prefix, 'global_data')}",
                    lapsed=True,
                ),
            )
            for prefix in sorted({t.prefix for t in self.trees})
        }
        self.parent_cp: dict[Tree, str] = {}
        self._refusals: dict[Tree, str] = {}  # the last command refused, until one goes through
        self._closing = False
        self._timers = ViewTimers[Tree](clock, self.publish)
        self._warned_no_tree: set[str] = set()
        self._log_limit = RateLimit(LOG_PER_SECOND, LOG_BURST, kind="openwb_mqtt")
        for tree in self.trees:
            # If the service dies (or loses the broker), the primary must read an error with a
            # text and no stale power or charging; a broker keeps one will per client, so each
            # of these is a will of its own (mqtt/connection.py holds one client per will).
            for name, value in _WILL.items():
                connection.add_will(tree.get_base + name, json.dumps(value))
            for name in (*COMMANDS, "parent_cp"):
                connection.subscribe(
                    tree.set_base + name, lambda m, t=tree, n=name: self._command(t, n, m)
                )
        for prefix in self.heartbeats:
            connection.subscribe(
                global_topic(prefix, "global_data"), lambda m, p=prefix: self._global_data(p, m)
            )
            connection.subscribe(global_topic(prefix, "last_tag"), self._last_tag)
        control.resolve_heartbeat(OPENWB_MQTT, self._heartbeat_of)
        registry.subscribe(self._changed)

    # --- trees and charge points ----------------------------------------------------------

    def tree_of(self, point: cp.ChargePoint) -> Tree | None:
        """The tree the charge point is published in (None: it has none)."""
        for tree in self.trees:
            if tree.serial == point.identity.serial:
                return tree
        station = self.settings.station_by_serial(point.identity.serial)
        if station is not None and station_tree(station) is not None:
            return None
        return next((t for t in self.trees if t.lp and t.lp == point.identity.lp), None)

    def point_of(self, tree: Tree) -> cp.ChargePoint | None:
        """The charge point published in the tree, if there is one now."""
        if tree.serial is not None:
            return self.registry.get(tree.serial)
        point = self.registry.at(tree.lp or 0)
        return point if point is not None and self.tree_of(point) == tree else None

    def _heartbeat_of(self, point: cp.ChargePoint) -> Heartbeat | None:
        tree = self.tree_of(point)
        if tree is None:
            if point.identity.serial not in self._warned_no_tree:
                self._warned_no_tree.add(point.identity.serial)
                log.warning(
                    "%s: controller is %s but it has no MQTT tree (only LP1 and LP2 have one by "
                    "default; set mqtt_prefix or duo_num in its [[station]]): it will not charge",
                    point.name,
                    OPENWB_MQTT,
                )
            return None
        return self.heartbeats[tree.prefix].clock

    # --- publishing -----------------------------------------------------------------------

    def publish(self, tree: Tree) -> None:
        """Publish the tree's values (the connection sends only what changed)."""
        point = self.point_of(tree)
        refused = self._refusals.get(tree, "")
        for name, value in get_values(point, tree, self.clock(), refused).items():
            self.mqtt.publish(tree.get_base + name, json.dumps(value), retain=True)
        self._timers.rendered(tree, point)

    def _changed(self, points: list[cp.ChargePoint]) -> None:
        if self._closing:
            return
        trees = {tree for tree in map(self.tree_of, points) if tree is not None}
        for tree in self.trees:  # also the tree a moved or forgotten point has left
            if tree in trees or (tree.lp is not None and self.point_of(tree) is None):
                self.publish(tree)

    # --- commands -------------------------------------------------------------------------

    def _decode(self, message: Message) -> Any:
        try:
            return json.loads(message.payload)
        except (ValueError, RecursionError):  # not UTF-8, not JSON, 4300+ digits, too deep
            raise _bad(f"not JSON: {message.payload[:40]!r}") from None

    def _log(self, level: int, text: str) -> None:
        """A log line about what a peer published: escaped, shortened and rate-limited."""
        if self._log_limit.allow(self.clock()):
            log.log(level, "%s%s", printable(text), self._log_limit.left_out())

    def _refused(self, topic: str, text: str, reason: str) -> None:
        # The primary repeats itself every cycle: logged once per topic until it changes.
        self.control.refused(
            OPENWB_MQTT, reason, f"MQTT {topic} ignored: {text}", key=f"MQTT {topic}"
        )

    def _handled(self, message: Message) -> bool:
        """Common part of every set topic: skip our own clears, clear what we handle."""
        if not message.payload:
            return False  # our own clear (or the primary's deletion)
        self.mqtt.publish(message.topic, b"", retain=True)
        return not self._closing

    def _command(self, tree: Tree, name: str, message: Message) -> None:
        if not self._handled(message):
            return
        topic = message.topic
        try:
            value = self._decode(message)
            if name == "parent_cp":
                self._parent_cp(tree, value)
                return
            if name in _ONE_SHOT and message.retain:
                self._refused(topic, "a retained copy of an old command, not carried out", "replay")
                return
            command = COMMANDS[name](value)
            point = self.point_of(tree)
            if point is None:
                raise cp.Refused(cp.RefusalKind.OFFLINE, f"no station is served at {tree.name}")
        except cp.Refused as refusal:
            self._refused(topic, str(refusal), refusal.kind.value)
            return
        if command is not None:
            try:
                self.control.execute(OPENWB_MQTT, [(point, command)], origin=f"MQTT {topic}")
            except cp.Refused as refusal:  # counted and logged by the control path
                if self._refusals.get(tree) != str(refusal):
                    self._refusals[tree] = str(refusal)  # the primary shows it (fault 1)
                    self.publish(tree)
                return
        self.control.accepted(f"MQTT {topic}")
        if self._refusals.pop(tree, None) is not None:
            self.publish(tree)

    def _parent_cp(self, tree: Tree, value: Any) -> None:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise _bad(f"parent_cp must be a string, got {value!r}")
        if self.parent_cp.get(tree) != str(value):
            self.parent_cp[tree] = str(value)
            self._log(logging.INFO, f"{tree.name} is charge point {value} of the openWB primary")

    def _last_tag(self, message: Message) -> None:
        if not self._handled(message):
            return
        try:
            if self._decode(message) is not None:
                raise _bad("last_tag takes null (there is no RFID reader to reset)")
        except cp.Refused as refusal:
            self._refused(message.topic, str(refusal), refusal.kind.value)

    def _global_data(self, prefix: str, message: Message) -> None:
        if not self._handled(message):
            return
        heartbeat = self.heartbeats[prefix]
        try:
            value = self._decode(message)
            timestamp = parse_heartbeat(value)
        except cp.Refused as refusal:
            self._refused(message.topic, str(refusal), refusal.kind.value)
            return
        self.control.accepted(f"MQTT {message.topic}")
        parent_ip = value.get("parent_ip")
        if isinstance(parent_ip, str) and parent_ip != heartbeat.parent_ip:
            heartbeat.parent_ip = parent_ip
            self._log(logging.INFO, f"openWB primary at {parent_ip} drives {prefix or 'openWB/'}")
        heartbeat.received(timestamp, message.retain)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Publish every tree (sent once connected)."""
        for prefix in self.heartbeats:
            log.info(
                "openWB MQTT: waiting for the primary's heartbeat on %s",
                global_topic(prefix, "global_data"),
            )
        for tree in self.trees:
            self.publish(tree)

    def close(self) -> None:
        """Take no more commands (shutdown has begun)."""
        self._closing = True

    async def stop(self) -> None:
        """Tell the primary the service is gone (fault 2)."""
        self._closing = True
        self._timers.close()
        for tree in self.trees:
            self.publish(tree)
            self.mqtt.publish(tree.get_base + "fault_state", str(FAULT_ERROR), retain=True)
            self.mqtt.publish(
                tree.get_base + "fault_str",
                json.dumps("openwb-modbus-evse is stopped"),
                retain=True,
            )
