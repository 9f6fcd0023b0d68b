"""The Rust ``dehneevse-mqtt-bridge``'s MQTT messages, as a controller interface ("bridge-mqtt").

Every station is published: ``new_connection`` when it connects, ``notify`` when it notifies,
``response_collect_data`` after every poll. Requests on the subscribe topic are answered from
the live sessions (no second poller). The set requests are not passed to the station raw: they
go through the charge-point state machine, and only for stations whose controller this is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from .. import chargepoint as cp
from ..evse.link import Session, StationListener, printable
from ..evse.protocol import StationData
from ..heartbeat import Heartbeat
from ..ratelimit import RateLimit
from . import rust_bridge_messages as m
from .connection import Message, MqttConnection
from .rust_bridge_messages import BadRequest, MessageType, Reason

if TYPE_CHECKING:
    from ..bridge import Bridge

log = logging.getLogger(__name__)

CONTROLLER = "bridge-mqtt"
# Refused requests are logged one line each: this many at once, then one every 3 s at most;
# the others are counted and said with the next line.
LOG_BURST = 20
LOG_LINES_PER_SECOND = 1 / 3


class RustBridgeApi(StationListener):
    """Publishes what the stations do; carries out requests; keeps the controller's heartbeat.

    Every request on the subscribe topic refreshes the heartbeat of the ``bridge-mqtt``
    stations; without one for ``bridge_heartbeat_timeout`` they stop charging.
    """

    def __init__(self, bridge: Bridge, connection: MqttConnection) -> None:
        topics = bridge.settings.bridge_topic_pair
        assert topics is not None
        self.bridge, self.mqtt = bridge, connection
        self.publish_topic, self.subscribe_topic = topics
        self.heartbeat = Heartbeat(
            bridge.settings.bridge_heartbeat_timeout,
            bridge.clock,
            self._heartbeat_changed,
            what=f"request on {self.subscribe_topic}",
        )
        self._log_limit = RateLimit(LOG_LINES_PER_SECOND, LOG_BURST)
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        connection.subscribe(self.subscribe_topic, self._received)
        bridge.link.listeners.append(self)
        bridge.heartbeats[CONTROLLER] = lambda _: self.heartbeat

    def start(self) -> None:
        """Watch the heartbeat."""
        self._task = asyncio.create_task(self.heartbeat.watch())

    def close(self) -> None:
        """Take no more commands (shutdown has begun); stations are still published."""
        self._closing = True

    async def stop(self) -> None:
        """Stop watching the heartbeat."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _heartbeat_changed(self, lapsed: bool) -> None:
        points = self.bridge.charge_points.values()
        self.bridge.apply_heartbeat(
            lapsed, (p for p in points if p.state.config.controller == CONTROLLER)
        )

    def _send(self, payload: bytes) -> None:
        self.mqtt.publish(self.publish_topic, payload)  # never blocks; dropped while offline

    # --- stations -> subscribers -----------------------------------------------------------

    def connected(self, session: Session) -> None:
        assert session.serial is not None
        self._send(m.new_connection(session.serial, session.firmware))

    def notified(self, session: Session) -> None:
        assert session.serial is not None
        self._send(m.bare(MessageType.NOTIFY, session.serial))

    def polled(self, session: Session, data: StationData) -> None:
        assert session.serial is not None
        self._send(m.collect_data(session.serial, data))

    # --- subscribers -> stations -----------------------------------------------------------

    def _received(self, message: Message) -> None:
        """One message from the subscribe topic: answered once, with a response or an error."""
        try:
            request = m.parse_request(message.payload)
            if message.retain:
                # A retained request is replayed on every (re)connect, long after it was meant.
                raise BadRequest(
                    Reason.REPLAY,
                    "retained requests are not carried out; publish requests without retain",
                    client_id=request.client_id,
                    request=request.type.value,
                )
            reply = self._carry_out(request)
        except BadRequest as err:
            self._refused(err)
            return
        self.heartbeat.refresh()
        self._send(reply)

    def _refused(self, err: BadRequest) -> None:
        self.bridge.metrics.command_refused(CONTROLLER, err.reason.value)
        if self._log_limit.allow(self.bridge.clock()):
            # What a peer sent must not forge log lines: escaped and cut.
            line = f"refused {err.request or 'a message'} for {err.client_id or 'no station'}"
            log.warning(
                "bridge-mqtt: %s%s", printable(f"{line}: {err}"), self._log_limit.left_out()
            )
        self._send(m.error(err))

    def _carry_out(self, request: m.Request) -> bytes:
        serial, kind = request.client_id, request.type

        def refuse(reason: Reason, text: str) -> BadRequest:
            return BadRequest(reason, text, client_id=serial, request=kind.value)

        point = self.bridge.charge_points.get(serial)
        if point is None:
            raise refuse(Reason.UNKNOWN_CLIENT_ID, "no station with this client_id is known")
        response = m.RESPONSE_TO[kind]
        if kind in (MessageType.REQUEST_PING, MessageType.REQUEST_DATA_COLLECTION):
            session = self.bridge.link.sessions.get(serial)
            if session is None or session.latest is None:
                raise refuse(Reason.OFFLINE, "the station is not connected")
            if kind is MessageType.REQUEST_PING:
                return m.bare(response, serial)
            # Its log went out with the poll that brought it; this answer does not repeat it.
            return m.collect_data(serial, session.latest, with_log=False)
        if self._closing:
            raise refuse(Reason.OFFLINE, "the service is shutting down")
        now = self.bridge.clock()
        try:
            cp.check_writer(point.state, CONTROLLER)
            if kind is MessageType.REQUEST_SET_PWM_PERCENT:
                assert request.pwm_percent is not None
                try:
                    centiamps = m.pwm_to_centiamps(request.pwm_percent)
                except ValueError as err:
                    raise refuse(Reason.BAD_VALUE, str(err)) from None
                state = cp.set_current(point.state, centiamps, now)
            else:
                assert request.contactor_state is not None
                state = cp.set_contactor_allowed(point.state, request.contactor_state, now)
        except cp.Refused as refusal:
            raise refuse(Reason(refusal.kind), str(refusal)) from None  # same names
        point.commit(state)
        return m.bare(response, serial)
