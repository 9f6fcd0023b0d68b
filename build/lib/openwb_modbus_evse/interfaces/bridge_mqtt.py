"""The Rust ``dehneevse-mqtt-bridge``'s MQTT messages, as a controller interface ("bridge-mqtt").

Every station is published: ``new_connection`` when it connects, ``notify`` when it notifies,
``response_collect_data`` after every poll. Requests on the subscribe topic are answered from
the live sessions (no second poller). The set requests are not passed to the station raw: they
go through the control path, and only for stations whose controller this is.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import chargepoint as cp
from ..config import Settings
from ..control import BRIDGE_MQTT, Command, Control, Kind
from ..evse.link import Session, StationListener
from ..evse.protocol import StationData
from ..mqtt.connection import Message, MqttConnection
from ..registry import Registry
from . import bridge_mqtt_messages as m
from .bridge_mqtt_messages import BadRequest, MessageType, Reason


class RustBridgeApi(StationListener):
    """Publishes what the stations do; carries out requests; keeps the controller's heartbeat.

    Every request carried out refreshes the heartbeat of the ``bridge-mqtt`` stations; without
    one for ``bridge_heartbeat_timeout`` they stop charging.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        control: Control,
        connection: MqttConnection,
        clock: Callable[[], float],
    ) -> None:
        topics = settings.bridge_topic_pair
        assert topics is not None
        self.registry, self.control, self.mqtt, self.clock = registry, control, connection, clock
        self.publish_topic, self.subscribe_topic = topics
        self.heartbeat = control.add_heartbeat(
            BRIDGE_MQTT,
            settings.bridge_heartbeat_timeout,
            what=f"request on {self.subscribe_topic}",
        )
        self._closing = False
        connection.subscribe(self.subscribe_topic, self._received)

    def close(self) -> None:
        """Take no more commands (shutdown has begun); stations are still published."""
        self._closing = True

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
            try:
                reply = self._carry_out(request)
            except cp.Refused as refusal:  # counted and logged by the control path
                err = BadRequest(
                    Reason(refusal.kind),  # same names
                    str(refusal),
                    client_id=request.client_id,
                    request=request.type.value,
                )
                self._send(m.error(err))
                return
        except BadRequest as err:
            what = f"{err.request or 'a message'} for {err.client_id or 'no station'}"
            self.control.refused(
                BRIDGE_MQTT, err.reason.value, f"bridge-mqtt: refused {what}: {err}"
            )
            self._send(m.error(err))
            return
        self.heartbeat.refresh()
        self._send(reply)

    def _carry_out(self, request: m.Request) -> bytes:
        serial, kind = request.client_id, request.type

        def refuse(reason: Reason, text: str) -> BadRequest:
            return BadRequest(reason, text, client_id=serial, request=kind.value)

        point = self.registry.get(serial)
        if point is None:
            raise refuse(Reason.UNKNOWN_CLIENT_ID, "no station with this client_id is known")
        response = m.RESPONSE_TO[kind]
        if kind in (MessageType.REQUEST_PING, MessageType.REQUEST_DATA_COLLECTION):
            session = self.registry.session(serial)
            if session is None or session.latest is None:
                raise refuse(Reason.OFFLINE, "the station is not connected")
            if kind is MessageType.REQUEST_PING:
                return m.bare(response, serial)
            # Its log went out with the poll that brought it; this answer does not repeat it.
            return m.collect_data(serial, session.latest, with_log=False)
        if self._closing:
            raise refuse(Reason.OFFLINE, "the service is shutting down")
        if kind is MessageType.REQUEST_SET_PWM_PERCENT:
            assert request.pwm_percent is not None
            try:
                command = Command(Kind.CURRENT, m.pwm_to_centiamps(request.pwm_percent))
            except ValueError as err:
                raise refuse(Reason.BAD_VALUE, str(err)) from None
        else:
            assert request.contactor_state is not None
            command = Command(Kind.CONTACTOR, request.contactor_state)
        self.control.execute(BRIDGE_MQTT, [(point, command)])
        return m.bare(response, serial)
