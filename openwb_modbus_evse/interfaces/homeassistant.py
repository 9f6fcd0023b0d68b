"""Home Assistant over MQTT: every served station appears by itself (MQTT discovery), and the
controller kind ``homeassistant`` drives stations through its entities.

What Home Assistant sees is rendered from the view (view.py); the messages are built in
:mod:`.homeassistant_messages`. Commands become :class:`~..control.Command` s on the one control
path, so for a station driven by another controller they are shown but refused (logged, counted).

The enable switch and the max-current number map to one command: enabled -> the max current,
disabled -> 0. The max current Home Assistant set is kept across restarts (the state file); the
switch is not: after a restart, or after Home Assistant went away, nothing is enabled until it
asks again, and the switch shows that.

Home Assistant's presence is the controller's heartbeat, driven by events, not time: present from
its ``online`` on ``<prefix>/status`` (retained or live) or its first command after start-up;
absent after ``offline`` (also its last will) or when the service loses the broker. Then its
stations stop charging the safe way, and they charge again only on a new command. Commands that
are retained or arrive while it is absent are not carried out.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Callable

from .. import chargepoint as cp
from ..config import Settings
from ..control import HOMEASSISTANT, Command, Control, Kind
from ..evse.link import printable
from ..mqtt.connection import Message, MqttConnection
from ..ratelimit import RateLimit
from ..registry import Registry
from ..store import StoreError
from ..view import show
from . import homeassistant_messages as m
from .rerender import ViewTimers

log = logging.getLogger(__name__)

RECORD_PREFIX = "homeassistant/"
# Commands per second from Home Assistant (evcc sends a few per minute, a dragged slider a few per
# second): a burst, then this rate; what is over it is refused and counted.
COMMANDS_PER_SECOND, COMMAND_BURST = 50.0, 100
# A status flood (online, online, ...) republishes everything at most this often.
REPUBLISH_INTERVAL = 1.0
# The max current is written to the state file at most this often (the latest value wins): a
# slider dragged in Home Assistant sends a command per step.
SAVE_DELAY = 1.0
LOG_BURST, LOG_PER_SECOND = 20, 0.1


class Presence(enum.Enum):
    """What the service knows of Home Assistant."""

    UNKNOWN = "unknown"  # nothing heard since start-up or since the broker came back
    ONLINE = "online"
    OFFLINE = "offline"  # it said so (or its last will did)


class HomeAssistantApi:
    """Publishes discovery, states and availability; carries out Home Assistant's commands."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        control: Control,
        connection: MqttConnection,
        clock: Callable[[], float],
        service_id: str,
    ) -> None:
        self.settings, self.registry, self.control = settings, registry, control
        self.mqtt, self.clock = connection, clock
        self.prefix = settings.ha_discovery_prefix
        self.service_availability = m.service_availability_topic(service_id)
        self.service_id = service_id
        self.presence = Presence.UNKNOWN
        # Lapsed until Home Assistant is known to be there: nothing charges before it asks.
        self.heartbeat = control.add_heartbeat(
            HOMEASSISTANT,
            math.inf,
            what=f"Home Assistant ({m.status_topic(self.prefix)})",
            lapsed=True,
        )
        self.choices: dict[str, m.Choice] = {}
        self.announced: set[str] = set()  # serials whose discovery message is out
        self._energy_kwh: dict[str, float] = {}
        self._timers = ViewTimers[str](clock, self._refresh)
        self._republish: asyncio.TimerHandle | None = None
        self._discovery: dict[str, tuple[m.Station, bytes]] = {}  # by serial, until withdrawn
        self._pending: set[str] = set()  # serials to publish once the station has its command
        self._unsaved: dict[str, object] = {}
        self._save_timer: asyncio.TimerHandle | None = None
        self._last_republish = -math.inf
        self._rate = RateLimit(COMMANDS_PER_SECOND, COMMAND_BURST)
        self._log_limit = RateLimit(LOG_PER_SECOND, LOG_BURST)
        self._closing = False
        connection.add_will(self.service_availability, m.OFFLINE)
        connection.subscribe(m.status_topic(self.prefix), self._status)
        connection.subscribe(m.COMMAND_FILTER, self._command)
        connection.subscribe(m.availability_filter(service_id), self._left_behind)
        connection.on_disconnect(self._broker_lost)
        registry.subscribe(self._changed)

    # --- what Home Assistant sees -----------------------------------------------------------

    def _station(self, point: cp.ChargePoint) -> m.Station:
        ident = point.identity.public_id
        configured = self.settings.station_by_serial(point.identity.serial)
        config = point.state.config
        return m.Station(
            ident=ident,
            name=(configured.name if configured else None) or m.default_name(ident),
            max_current_a=config.max_current_a,
            can_switch_phases=config.can_switch_phases,
        )

    def choice(self, point: cp.ChargePoint) -> m.Choice:
        """What Home Assistant chose for the station (the default: its max current, off)."""
        serial = point.identity.serial
        found = self.choices.get(serial)
        if found is None:
            limit = min(cp.MAX_CURRENT_CA, round(point.state.config.max_current_a * 100))
            found = self.choices[serial] = m.Choice(max(cp.MIN_CURRENT_CA, limit))
        return found

    def publish(self, point: cp.ChargePoint, *, retain: bool = True) -> None:
        """Publish the station's discovery, state and availability (only what changed is sent,
        unless ``retain`` is False: then everything goes out live, for a restarted Home
        Assistant)."""
        serial = point.identity.serial
        now = self.clock()
        shown = show(point, now)
        energy = max(self._energy_kwh.get(serial, 0.0), shown.energy_wh / 1000)
        self._energy_kwh[serial] = energy
        session = self.registry.session(serial)
        sequence = point.state.sequence
        values = m.state(
            shown,
            choice=self.choice(point),
            energy_kwh=energy,
            phases=point.state.phases,
            firmware=session.firmware if session is not None else None,
            interrupting=sequence is not None and sequence.stage is cp.Stage.HOLD,
        )
        station = self._station(point)
        known = self._discovery.get(serial)
        if known is None or known[0] != station:
            known = self._discovery[serial] = (
                station,
                m.encode(m.discovery(station, self.service_id)),
            )
        config, ident = known[1], station.ident
        self.mqtt.publish(m.discovery_topic(self.prefix, ident), config, retain=retain)
        self.mqtt.publish(m.state_topic(ident), m.encode(values), retain=retain)
        self.mqtt.publish(
            m.availability_topic(self.service_id, ident), m.availability(shown), retain=retain
        )
        self.announced.add(serial)
        self._timers.rendered(serial, point)

    def _refresh(self, serial: str) -> None:
        point = self.registry.get(serial)
        if point is not None and point.identity.lp is not None:
            self.publish(point)

    def withdraw(self, point: cp.ChargePoint) -> None:
        """The station is gone for good: its device disappears from Home Assistant."""
        serial = point.identity.serial
        self._timers.cancel(serial)
        self._delete(point.identity.public_id)
        self.announced.discard(serial)
        self._discovery.pop(serial, None)
        self._energy_kwh.pop(serial, None)
        if self.choices.pop(serial, None) is not None:
            self._save_soon(RECORD_PREFIX + serial, None)
        log.info("Home Assistant: station %s withdrawn (discovery config removed)", point.name)

    def _delete(self, ident: str) -> None:
        """Delete the retained discovery, state and availability of station ``ident``."""
        for topic in (
            m.discovery_topic(self.prefix, ident),
            m.state_topic(ident),
            m.availability_topic(self.service_id, ident),
        ):
            self.mqtt.publish(topic, b"", retain=True)  # empty retained: deleted

    def _changed(self, points: list[cp.ChargePoint]) -> None:
        if self._closing:
            return
        for point in points:
            serial = point.identity.serial
            if self.registry.get(serial) is not point:  # forgotten or released
                self._pending.discard(serial)
                if serial in self.announced:
                    self.withdraw(point)
            elif point.identity.lp is not None:  # served
                self._publish_soon(serial)

    def _publish_soon(self, serial: str) -> None:
        """Publish after the station's session has sent its command: the registry wakes the
        sessions after its listeners, and their tasks run one loop turn later, so this waits
        two turns (a command's way to the station is the measured path, see make bench)."""
        if not self._pending:
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._publish_pending)
        self._pending.add(serial)

    def _publish_pending(self) -> None:
        pending, self._pending = self._pending, set()
        if self._closing:
            return
        for serial in pending:
            point = self.registry.get(serial)
            if point is not None and point.identity.lp is not None:
                self.publish(point)

    def _left_behind(self, message: Message) -> None:
        """A retained station availability of this service (it comes on every connect): a
        station this run does not serve (one that came and went before a crash) is withdrawn,
        so that Home Assistant shows no stale entities for it."""
        if not message.payload or not message.retain or self._closing:
            return
        ident = m.availability_ident(message.topic)
        point = self.registry.by_public_id(ident)
        if point is None:
            self._delete(ident)
            log.info("Home Assistant: station %s withdrawn (not served since a restart)", ident)
        elif point.identity.lp is None:
            self.withdraw(point)

    def republish(self) -> None:
        """Everything again, live: Home Assistant (re)started and reads it now."""
        self._republish = None
        self._last_republish = self.clock()
        self.mqtt.publish(self.service_availability, m.ONLINE, retain=False)
        for point in self.registry.points():
            if point.identity.lp is not None:
                self.publish(point, retain=False)

    def _schedule_republish(self) -> None:
        if self._republish is not None or self._closing:
            return
        delay = max(0.0, self._last_republish + REPUBLISH_INTERVAL - self.clock())
        self._republish = asyncio.get_running_loop().call_later(delay, self.republish)

    # --- Home Assistant's presence ------------------------------------------------------------

    def _status(self, message: Message) -> None:
        payload = message.payload.strip()
        if payload == m.ONLINE.encode():
            self.presence = Presence.ONLINE
            self.heartbeat.refresh()
            self._schedule_republish()
        elif payload == m.OFFLINE.encode():
            self._gone(Presence.OFFLINE, "Home Assistant is offline")
        elif payload:  # empty: a retained status deleted
            self._log(f"MQTT {message.topic}: ignored {payload[:40]!r} (online or offline)")

    def _broker_lost(self) -> None:
        self._gone(Presence.UNKNOWN, "the MQTT broker is gone (no word from Home Assistant)")

    def _gone(self, presence: Presence, why: str) -> None:
        """Home Assistant is gone: stop its stations the safe way, and disable them, so that
        they charge again only on a new command once it is back."""
        self.presence = presence
        self.heartbeat.lapse(why)
        for point in self.registry.points():
            if point.state.config.controller != HOMEASSISTANT:
                continue
            choice = self.choice(point)
            if choice.enabled:
                self._carry_out(point, m.Choice(choice.max_ca, False), [], why)

    # --- commands ---------------------------------------------------------------------------

    def _refused(self, topic: str, text: str, reason: str, *, served: bool = True) -> None:
        # Logged once per topic until it changes; but only for served stations' topics, so that
        # made-up serials cannot grow that memory (their lines are rate-limited all the same).
        key = f"MQTT {topic}" if served else None
        self.control.refused(HOMEASSISTANT, reason, f"MQTT {topic} ignored: {text}", key=key)

    def _command(self, message: Message) -> None:
        topic = message.topic
        where = m.parse_command_topic(topic)
        if where is None or self._closing:
            return
        ident, control = where
        if not message.payload:
            return  # a retained command deleted
        point = self.registry.by_public_id(ident)
        served = point is not None and point.identity.lp is not None
        if message.retain:
            text = "a retained command is an old one: not carried out"
            self._refused(topic, text, "replay", served=served)
            return
        if not self._rate.allow(self.clock()):
            self._refused(topic, "too many commands", "rate", served=served)
            return
        if self.presence is Presence.OFFLINE:
            text = "Home Assistant said it is offline: not carried out"
            self._refused(topic, text, "offline", served=served)
            return
        try:
            if point is None or point.identity.lp is None:
                raise cp.Refused(cp.RefusalKind.OFFLINE, f"no station {ident} is served")
            choice, extra = self._parse(point, control, message.payload)
        except cp.Refused as refusal:
            self._refused(topic, str(refusal), refusal.kind.value, served=served)
            return
        if self.presence is Presence.UNKNOWN and point.state.config.controller == HOMEASSISTANT:
            # Its first command since start-up (or since the broker came back): it is there.
            self.presence = Presence.ONLINE
            self.heartbeat.refresh()
        if self._carry_out(point, choice, extra, f"MQTT {topic}"):
            self.control.accepted(f"MQTT {topic}")

    def _parse(
        self, point: cp.ChargePoint, control: str, payload: bytes
    ) -> tuple[m.Choice, list[Command]]:
        """The new choice and the commands besides the current that ``control`` asks for."""
        choice = self.choice(point)
        if control == "max_current":
            return m.Choice(m.parse_max_current(payload), choice.enabled), []
        if control == "enable":
            return m.Choice(choice.max_ca, m.parse_switch(payload)), []
        if control == "phases":
            phases = m.parse_phases(payload)
            return choice, [Command(Kind.PHASES, phases), Command(Kind.PHASE_SWITCH)]
        m.parse_press(payload)
        return choice, [Command(Kind.CP_INTERRUPTION, m.CP_INTERRUPTION_S)]

    def _carry_out(
        self, point: cp.ChargePoint, choice: m.Choice, extra: list[Command], origin: str
    ) -> bool:
        """Ask the control path for the choice's current and ``extra``, all or nothing; keep
        the choice if it went through."""
        orders = [(point, Command(Kind.CURRENT, choice.requested_ca))]
        orders += [(point, command) for command in extra]
        try:
            self.control.execute(HOMEASSISTANT, orders, origin=origin)
        except cp.Refused:
            return False  # counted and logged by the control path
        serial = point.identity.serial
        old = self.choice(point)
        self.choices[serial] = choice
        if choice.max_ca != old.max_ca:
            self._save_soon(RECORD_PREFIX + serial, {"max_current_ca": choice.max_ca})
        if choice != old:
            self._publish_soon(serial)
        return True

    # --- state file -------------------------------------------------------------------------

    def _load(self) -> None:
        store = self.registry.store
        if store is None:
            return
        for key, value in store.records(RECORD_PREFIX).items():
            serial = key[len(RECORD_PREFIX) :]
            max_ca = value.get("max_current_ca") if isinstance(value, dict) else None
            if isinstance(max_ca, int) and cp.MIN_CURRENT_CA <= max_ca <= cp.MAX_CURRENT_CA:
                self.choices[serial] = m.Choice(max_ca)

    def _save_soon(self, key: str, value: object) -> None:
        self._unsaved[key] = value
        if self._save_timer is None:
            self._save_timer = asyncio.get_running_loop().call_later(SAVE_DELAY, self.save)

    def save(self) -> None:
        """Write the choices that changed to the state file."""
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        records, self._unsaved = self._unsaved, {}
        store = self.registry.store
        if store is None or not records:
            return
        try:
            store.save_records(records)
        except StoreError as err:  # kept in memory all the same; only a restart forgets it
            log.error("%s", err)

    def _log(self, text: str) -> None:
        if self._log_limit.allow(self.clock()):
            log.warning("%s%s", printable(text), self._log_limit.left_out())

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Read the kept choices, say the service is online (sent once connected)."""
        self._load()
        self.mqtt.publish(self.service_availability, m.ONLINE, retain=True)
        log.info(
            "Home Assistant: discovery on %s/device/..., waiting for its status on %s",
            self.prefix,
            m.status_topic(self.prefix),
        )
        for point in self.registry.points():
            if point.identity.lp is not None:
                self.publish(point)

    def close(self) -> None:
        """Take no more commands (shutdown has begun)."""
        self._closing = True

    async def stop(self) -> None:
        """Say the service is offline (its entities become unavailable)."""
        self._closing = True
        self._timers.close()
        if self._republish is not None:
            self._republish.cancel()
        self.save()
        self.mqtt.publish(self.service_availability, m.OFFLINE, retain=True)
