"""The one control path: a controller asks a charge point for something.

Every controller interface (Modbus, openWB MQTT, Rust-bridge MQTT, ...) only translates its wire
format into :class:`Command` s and hands them to :meth:`Control.execute`. Here, and only here,
the writer is checked (only the charge point's own ``controller`` may write), the charging state
machine (:mod:`.chargepoint`) is asked, what changed is logged, refusals are counted and logged,
and the new state is committed. So a new interface cannot forget a safety check: it has none.

The controllers' heartbeats are one mechanism too: each interface creates its heartbeats here
(one per controller, or one per scope such as an openWB topic prefix) and says which one applies
to a charge point; a lapse or recovery is applied to exactly the charge points it drives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from . import chargepoint as cp
from .config import CONTROLLERS
from .evse.link import printable
from .heartbeat import Heartbeat
from .ratelimit import RateLimit

log = logging.getLogger(__name__)

#: The controller kinds (``controller`` of a station, config.CONTROLLERS): every interface
#: reads, only the station's own controller writes.
MODBUS, OPENWB_MQTT, BRIDGE_MQTT, OCPP, HOMEASSISTANT, MANUAL = CONTROLLERS

# Log lines a peer can cause (one per command): a burst, then one per second, per kind; what is
# left out is counted and said with the next line.
LOG_BURST, LOG_PER_SECOND = 20, 1.0


class Kind(StrEnum):
    """What a controller can ask of a charge point."""

    CURRENT = "current"  # centiamps: 0, or 600..3200
    PHASES = "phases"  # the phase target for the next phase switch: 1 or 3
    PHASE_SWITCH = "phase_switch"  # run the phase switch to the target now
    CP_INTERRUPTION = "cp_interruption"  # seconds of control-pilot interruption: 1..60
    CONTACTOR = "contactor"  # whether the contactor may close (bridge-mqtt)
    HEARTBEAT_ENFORCED = "heartbeat_enforced"  # whether the heartbeat applies (Modbus)


@dataclass(frozen=True)
class Command:
    """One thing a controller asks; ``value`` as :class:`Kind` says."""

    kind: Kind
    value: int | bool = 0


_APPLY: dict[Kind, Callable[[cp.State, int, float], cp.State]] = {
    Kind.CURRENT: cp.set_current,
    Kind.PHASES: cp.set_phase_target,
    Kind.PHASE_SWITCH: lambda state, _, now: cp.trigger_phase_switch(state, now),
    Kind.CP_INTERRUPTION: cp.start_cp_interruption,
    Kind.CONTACTOR: lambda state, value, now: cp.set_contactor_allowed(state, bool(value), now),
    Kind.HEARTBEAT_ENFORCED: lambda state, value, now: cp.set_heartbeat_enforced(
        state, bool(value), now
    ),
}


class ControlObserver(Protocol):
    """Counts refusals (metrics)."""

    def command_refused(self, interface: str, reason: str) -> None:
        """One command of ``interface`` was refused for ``reason``."""


class _NoObserver:
    def command_refused(self, interface: str, reason: str) -> None:
        pass


@dataclass(frozen=True)
class HeartbeatEntry:
    """A controller's heartbeat, and its scope ("" or, e.g., an openWB topic prefix)."""

    controller: str
    scope: str
    heartbeat: Heartbeat


class Control:
    """Carries out controllers' commands; keeps the controllers' heartbeats."""

    def __init__(
        self,
        clock: Callable[[], float],
        points: Callable[[], Iterable[cp.ChargePoint]],
        observer: ControlObserver | None = None,
    ) -> None:
        self._clock = clock
        self._points = points
        self.observer: ControlObserver = observer or _NoObserver()
        self.heartbeats: list[HeartbeatEntry] = []
        self._resolvers: dict[str, Callable[[cp.ChargePoint], Heartbeat | None]] = {}
        self._change_log: dict[str, RateLimit] = {}
        self._refusal_log: dict[tuple[str, str], RateLimit] = {}
        self._last_refusal: dict[str, str] = {}

    # --- commands -------------------------------------------------------------------------

    def execute(
        self,
        controller: str,
        orders: Iterable[tuple[cp.ChargePoint, Command]],
        *,
        origin: str = "",
    ) -> None:
        """Carry out every order, or none: the first refusal is counted, logged and raised
        (:class:`~.chargepoint.Refused`) and nothing has changed. ``origin`` (e.g. a topic)
        names where the command came from in the log; a refusal is logged once per origin
        until it changes."""
        now = self._clock()
        staged: dict[int, tuple[cp.ChargePoint, cp.State]] = {}
        for point, command in orders:
            state = staged.get(id(point), (point, point.state))[1]
            try:
                cp.check_writer(state, controller)
                new = _APPLY[command.kind](state, int(command.value), now)
            except cp.Refused as refusal:
                what = f"{point.name}: {command.kind} {command.value!r} refused: {refusal}"
                if origin:
                    what = f"{origin} ignored: {what}"
                self.refused(controller, refusal.kind.value, what, key=origin or None)
                raise
            staged[id(point)] = (point, new)
        for point, new in staged.values():
            changes = cp.describe_changes(point.state, new)
            if changes:
                self._log_change(controller, f"{point.name}: {', '.join(changes)} ({controller})")
            point.commit(new)

    def refused(self, controller: str, reason: str, text: str, *, key: str | None = None) -> None:
        """Count and log (rate-limited) a refused command: the state machine's refusals and an
        interface's own (not JSON, a retained replay, ...). With ``key`` (e.g. a topic) the same
        text is logged once until it changes: a controller that repeats itself every cycle."""
        self.observer.command_refused(controller, reason)
        if key is not None:
            if self._last_refusal.get(key) == text:
                return
            self._last_refusal[key] = text
        limit = self._refusal_log.setdefault(
            (controller, reason), RateLimit(LOG_PER_SECOND, LOG_BURST, kind="refusal")
        )
        if limit.allow(self._clock()):
            log.warning("%s%s", printable(text), limit.left_out())

    def accepted(self, key: str) -> None:
        """A command on ``key`` went through: a refusal there is logged again next time."""
        self._last_refusal.pop(key, None)

    def _log_change(self, controller: str, text: str) -> None:
        limit = self._change_log.setdefault(
            controller, RateLimit(LOG_PER_SECOND, LOG_BURST, kind="command")
        )
        if limit.allow(self._clock()):
            log.info("%s%s", text, limit.left_out())

    # --- heartbeats -----------------------------------------------------------------------

    def add_heartbeat(
        self,
        controller: str,
        timeout: float,
        *,
        scope: str = "",
        what: str,
        lapsed: bool = False,
    ) -> Heartbeat:
        """A new heartbeat of ``controller``; its lapses apply to the points it drives."""

        def changed(_: bool) -> None:
            self._apply(heartbeat)

        heartbeat = Heartbeat(timeout, self._clock, changed, what=what, lapsed=lapsed)
        self.heartbeats.append(HeartbeatEntry(controller, scope, heartbeat))
        if controller not in self._resolvers:
            self._resolvers[controller] = lambda _: heartbeat
        return heartbeat

    def resolve_heartbeat(
        self, controller: str, resolver: Callable[[cp.ChargePoint], Heartbeat | None]
    ) -> None:
        """Which of ``controller``'s heartbeats applies to a charge point (when it has several)."""
        self._resolvers[controller] = resolver

    def heartbeat_of(self, point: cp.ChargePoint) -> Heartbeat | None:
        """The heartbeat that applies to ``point`` (None: its controller has none running)."""
        resolver = self._resolvers.get(point.state.config.controller)
        return resolver(point) if resolver is not None else None

    def sync(self, point: cp.ChargePoint) -> None:
        """Take over the lapse state of the heartbeat that applies to ``point`` now (a new
        charge point, or one moved to another LP)."""
        heartbeat = self.heartbeat_of(point)
        lapsed = heartbeat is None or heartbeat.lapsed
        point.commit(cp.set_heartbeat_lapsed(point.state, lapsed, self._clock()))

    def _apply(self, heartbeat: Heartbeat) -> None:
        now = self._clock()
        driven = [p for p in self._points() if self.heartbeat_of(p) is heartbeat]
        for point in driven:
            point.commit(cp.set_heartbeat_lapsed(point.state, heartbeat.lapsed, now))
        enforced = [p.name for p in driven if p.state.enforce_heartbeat]
        if not enforced:
            return  # nothing this heartbeat stops: nothing to say
        if heartbeat.lapsed and heartbeat.lapse_reason:  # an event-driven heartbeat
            log.warning(
                "heartbeat: %s; %s stop charging (or fall back to failsafe_current)",
                heartbeat.lapse_reason,
                ", ".join(enforced),
            )
        elif heartbeat.lapsed:
            log.warning(
                "heartbeat: no %s for %g s; %s stop charging (or fall back to failsafe_current)",
                heartbeat.what,
                heartbeat.timeout,
                ", ".join(enforced),
            )
        else:
            log.info("heartbeat: %s arrived; the requested currents apply again", heartbeat.what)

    async def watch(self) -> None:
        """Lapse every heartbeat at its deadline; runs until cancelled."""
        await asyncio.gather(*(entry.heartbeat.watch() for entry in self.heartbeats))
