"""The openWB software 2.x secondary API over MQTT: what an openWB primary drives.

The primary (charge-point type "secondary openWB") publishes retained JSON to
``<prefix>openWB/set/internal_chargepoint/...`` and reads the retained values under
``<prefix>openWB/internal_chargepoint/<duo>/get/``. Each charge point has one such tree: LP1 and
LP2 are duo 0 and 1 without a prefix (one broker looks like an openWB Duo); ``mqtt_prefix`` and
``duo_num`` in ``[[station]]`` place a station anywhere else (with a mosquitto mount point).

Commands go through the charge-point state machine like Modbus writes; a bad one is logged once
(until it changes), counted and ignored. Every set topic is cleared after handling (an empty
retained publish), and one-shot commands (phase-switch trigger, pilot interruption) are only
carried out when they arrive live, never from a retained replay after a reconnect.

The primary's heartbeat (``global_data``) counts when its timestamp is newer than the previous
one, timed by arrival on our monotonic clock (the two clocks need not agree); a retained replay
only sets the baseline. Each prefix has its own heartbeat, applied to the charge points of that
prefix that this interface controls. It starts lapsed: nothing charges on a stale retained
set_current until a live heartbeat arrives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from .. import chargepoint as cp
from ..config import Settings, station_tree
from ..evse.link import printable
from ..heartbeat import Heartbeat
from ..ratelimit import RateLimit
from .connection import Message, MqttConnection

if TYPE_CHECKING:
    from ..bridge import Bridge

log = logging.getLogger(__name__)

CONTROLLER = "openwb-mqtt"
REFRESH_INTERVAL = 1.0  # s between checks for values that changed by time alone (stale data)
FAULT_OK, FAULT_WARNING, FAULT_ERROR = 0, 1, 2
_VERSION = f"openwb-modbus-evse {version('openwb-modbus-evse')}"
# Log lines caused by what peers publish: a burst, then one every 10 s (refusals stay counted).
LOG_BURST, LOG_PER_SECOND = 30, 0.1
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


def get_values(
    point: cp.ChargePoint | None, tree: Tree, now: float, heartbeat_lapsed: bool
) -> dict[str, Any]:
    """Every get/ topic of the tree and its JSON value. No fresh data: fault 2 and zeros."""
    values: dict[str, Any] = {
        "power": 0.0,
        "imported": _r(point.energy.wh) if point else 0.0,
        "exported": 0.0,
        "currents": [0.0, 0.0, 0.0],
        "voltages": [0.0, 0.0, 0.0],
        "powers": [0.0, 0.0, 0.0],
        "phases_in_use": 0,
        "plug_state": False,
        "charge_state": False,
        "evse_current": 0.0,
        "max_evse_current": 0.0,
        "serial_number": point.identity.serial_number if point else "",
        "version": _VERSION,
    }
    if point is None:
        what = f"LP{tree.lp}" if tree.lp else f"station {tree.serial}"
        return values | _fault(FAULT_ERROR, f"openwb-modbus-evse: no station is {what} yet")
    state = point.state
    values["max_evse_current"] = _r(state.config.max_current_a)
    data = cp.fresh_data(state, now, point.max_data_age)
    if data is None:
        why = "is not connected" if not state.connected else "sends no fresh data"
        return values | _fault(FAULT_ERROR, f"openwb-modbus-evse: station {point.name} {why}")
    currents = [_r(ma / 1000) for ma in data.currents_ma]
    charging = cp.charging(state)
    cable_a = cp.cable_limit_ca(state) / 100
    values |= {
        "power": _r(data.power_w),
        "currents": currents,
        "voltages": [_r(mv / 1000) for mv in data.voltages_mv],
        "powers": [_r(w) for w in data.phase_powers_w],
        "phases_in_use": sum(ma >= cp.STOPPED_MA for ma in data.currents_ma) if charging else 0,
        "plug_state": data.pilot.plugged,
        "charge_state": charging,
        "evse_current": _r(cp.offered_amps(data.pwm)),
        "max_evse_current": _r(min(state.config.max_current_a, cable_a or math.inf)),
    }
    return values | _fault(*_warning(state, data, heartbeat_lapsed))


def _fault(level: int, text: str) -> dict[str, Any]:
    return {"fault_state": level, "fault_str": text}


def _warning(state: cp.State, data: Any, heartbeat_lapsed: bool) -> tuple[int, str]:
    if state.config.controller != CONTROLLER:
        return FAULT_WARNING, (
            f"controlled over {state.config.controller}, not by this openWB: commands are refused"
        )
    if heartbeat_lapsed:
        return FAULT_WARNING, "no heartbeat from the openWB primary: charging is stopped"
    if state.switch_failed:
        return FAULT_WARNING, "the phase-switch command failed: charging stays stopped"
    seq = state.sequence
    if data.pilot.is_fault and not (seq is not None and seq.stage is cp.Stage.HOLD):
        return FAULT_ERROR, f"control-pilot fault (state {data.pilot.state})"
    return FAULT_OK, ""


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


def _phases(state: cp.State, value: Any, now: float) -> cp.State:
    return cp.set_phase_target(state, _int("phases_to_use", value), now)


def _trigger(state: cp.State, value: Any, now: float) -> cp.State:
    if not isinstance(value, bool):
        raise _bad(f"trigger_phase_switch must be true or false, got {value!r}")
    return cp.trigger_phase_switch(state, now) if value else state


def _interrupt(state: cp.State, value: Any, now: float) -> cp.State:
    seconds = _int("cp_interruption_duration", value)
    if seconds < 0:
        raise _bad(f"cp_interruption_duration must be 0 or more seconds, got {seconds}")
    return cp.start_cp_interruption(state, seconds, now) if seconds else state


#: What each ``.../<duo>/data/<name>`` command does to the charge point state.
COMMANDS: dict[str, Callable[[cp.State, Any, float], cp.State]] = {
    "set_current": lambda state, value, now: cp.set_current(state, parse_set_current(value), now),
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

    def __init__(
        self, prefix: str, timeout: float, clock: Callable[[], float], on_change: Callable
    ) -> None:
        self.prefix = prefix
        what = f"openWB heartbeat on {global_topic(prefix, 'global_data')}"
        # Lapsed until the first live heartbeat: a retained set_current may be hours old.
        self.clock = Heartbeat(timeout, clock, on_change, what=what, lapsed=True)
        self.last_timestamp: float | None = None
        self.parent_ip: str | None = None

    def received(self, timestamp: float, retained: bool) -> bool:
        """A heartbeat arrived; True if it counts as fresh (and refreshed the clock)."""
        fresh = not retained and (self.last_timestamp is None or timestamp > self.last_timestamp)
        if self.last_timestamp is None or timestamp > self.last_timestamp:
            self.last_timestamp = timestamp
        if fresh:
            self.clock.refresh()
        return fresh


# --- the interface ----------------------------------------------------------------------------


class OpenWbSecondary:
    """Publishes every tree, takes the primary's commands, keeps one heartbeat per prefix."""

    def __init__(self, bridge: Bridge, connection: MqttConnection) -> None:
        self.bridge = bridge
        self.mqtt = connection
        self.trees = trees_of(bridge.settings)
        self.heartbeats = {
            prefix: PrimaryHeartbeat(
                prefix,
                bridge.settings.mqtt_heartbeat_timeout,
                bridge.clock,
                lambda lapsed, prefix=prefix: self._heartbeat_changed(prefix, lapsed),
            )
            for prefix in sorted({t.prefix for t in self.trees})
        }
        self.parent_cp: dict[Tree, str] = {}
        self._last_refusal: dict[str, str] = {}  # topic -> refusal logged last (log once)
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._warned_no_tree: set[str] = set()
        self._log_limit = RateLimit(LOG_PER_SECOND, LOG_BURST)
        for tree in self.trees:
            connection.add_will(tree.get_base + "fault_state", str(FAULT_ERROR))
            for name in (*COMMANDS, "parent_cp"):
                connection.subscribe(
                    tree.set_base + name, lambda m, t=tree, n=name: self._command(t, n, m)
                )
        for prefix in self.heartbeats:
            connection.subscribe(
                global_topic(prefix, "global_data"), lambda m, p=prefix: self._global_data(p, m)
            )
            connection.subscribe(global_topic(prefix, "last_tag"), self._last_tag)
        bridge.heartbeats[CONTROLLER] = self._heartbeat_of
        bridge.change_listeners.append(self._changed)

    # --- trees and charge points ----------------------------------------------------------

    def tree_of(self, point: cp.ChargePoint) -> Tree | None:
        """The tree the charge point is published in (None: it has none)."""
        for tree in self.trees:
            if tree.serial == point.identity.serial:
                return tree
        station = self.bridge.settings.station_by_serial(point.identity.serial)
        if station is not None and station_tree(station) is not None:
            return None
        return next((t for t in self.trees if t.lp and t.lp == point.identity.lp), None)

    def point_of(self, tree: Tree) -> cp.ChargePoint | None:
        """The charge point published in the tree, if there is one now."""
        if tree.serial is not None:
            return self.bridge.charge_points.get(tree.serial)
        point = self.bridge.charge_point_at(tree.lp or 0)
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
                    CONTROLLER,
                )
            return None
        return self.heartbeats[tree.prefix].clock

    # --- publishing -----------------------------------------------------------------------

    def publish(self, tree: Tree) -> None:
        """Publish the tree's values (the connection sends only what changed)."""
        point = self.point_of(tree)
        lapsed = self.heartbeats[tree.prefix].clock.lapsed
        for name, value in get_values(point, tree, self.bridge.clock(), lapsed).items():
            self.mqtt.publish(tree.get_base + name, json.dumps(value), retain=True)

    def _changed(self, point: cp.ChargePoint) -> None:
        tree = self.tree_of(point)
        if tree is not None and not self._closing:
            self.publish(tree)

    async def _refresh(self) -> None:
        while True:
            for tree in self.trees:
                self.publish(tree)
            await asyncio.sleep(REFRESH_INTERVAL)

    # --- commands -------------------------------------------------------------------------

    def _decode(self, message: Message) -> Any:
        try:
            return json.loads(message.payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad(f"not JSON: {message.payload[:40]!r}") from None

    def _log(self, level: int, text: str) -> None:
        """A log line about what a peer published: escaped, shortened and rate-limited."""
        if self._log_limit.allow(self.bridge.clock()):
            log.log(level, "%s", printable(text))

    def _refused(self, topic: str, refusal: cp.Refused | str, kind: str) -> None:
        text = str(refusal)
        self.bridge.metrics.command_refused(CONTROLLER, kind)
        if self._last_refusal.get(topic) != text:  # the primary repeats itself every cycle
            self._last_refusal[topic] = text
            self._log(logging.WARNING, f"MQTT {topic} ignored: {text}")

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
            point = self.point_of(tree)
            if point is None:
                raise cp.Refused(cp.RefusalKind.OFFLINE, f"no station is served at {tree.name}")
            now = self.bridge.clock()
            cp.check_writer(point.state, CONTROLLER)
            new = COMMANDS[name](point.state, value, now)
        except cp.Refused as refusal:
            self._refused(topic, refusal, refusal.kind.value)
            return
        self._last_refusal.pop(topic, None)
        for change in cp.describe_changes(point.state, new):
            log.info("%s: %s (openWB primary)", point.name, change)
        point.commit(new)

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
            self._refused(message.topic, refusal, refusal.kind.value)

    def _global_data(self, prefix: str, message: Message) -> None:
        if not self._handled(message):
            return
        heartbeat = self.heartbeats[prefix]
        try:
            value = self._decode(message)
            timestamp = parse_heartbeat(value)
        except cp.Refused as refusal:
            self._refused(message.topic, refusal, refusal.kind.value)
            return
        self._last_refusal.pop(message.topic, None)
        parent_ip = value.get("parent_ip")
        if isinstance(parent_ip, str) and parent_ip != heartbeat.parent_ip:
            heartbeat.parent_ip = parent_ip
            self._log(logging.INFO, f"openWB primary at {parent_ip} drives {prefix or 'openWB/'}")
        heartbeat.received(timestamp, message.retain)

    def _heartbeat_changed(self, prefix: str, lapsed: bool) -> None:
        points = []
        for tree in self.trees:
            point = self.point_of(tree) if tree.prefix == prefix else None
            if point is not None and point.state.config.controller == CONTROLLER:
                points.append(point)
        self.bridge.apply_heartbeat(lapsed, points)
        for tree in self.trees:
            if tree.prefix == prefix:
                self.publish(tree)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Publish every tree (sent once connected), watch the heartbeats."""
        for prefix in self.heartbeats:
            log.info(
                "openWB MQTT: waiting for the primary's heartbeat on %s",
                global_topic(prefix, "global_data"),
            )
        self._tasks = [asyncio.create_task(self._refresh())]
        self._tasks += [asyncio.create_task(h.clock.watch()) for h in self.heartbeats.values()]

    def close(self) -> None:
        """Take no more commands (shutdown has begun)."""
        self._closing = True

    async def stop(self) -> None:
        """Stop the tasks and tell the primary the service is gone (fault 2)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for tree in self.trees:
            self.publish(tree)
            self.mqtt.publish(tree.get_base + "fault_state", str(FAULT_ERROR), retain=True)
            self.mqtt.publish(
                tree.get_base + "fault_str",
                json.dumps("openwb-modbus-evse is stopped"),
                retain=True,
            )
