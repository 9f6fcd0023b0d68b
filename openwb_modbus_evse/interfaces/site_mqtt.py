"""The service's own MQTT topics under ``mqtt_topic_prefix``: the grid operator's dimming limit.

``<prefix>set/supply_limit`` takes a limit for the whole supply (see
:func:`~..dimming.parse_limit`; empty or ``null`` clears it). A retained message counts too: a
limit is a state, not a one-off command, and a broker that replays it after a restart says what
is still meant. What cannot be read is refused (counted and logged) and changes nothing.
"""

from __future__ import annotations

from ..config import Settings
from ..control import Control
from ..dimming import MQTT, BadLimit, Dimming, parse_limit
from ..mqtt.connection import Message, MqttConnection
from ..store import StoreError

INTERFACE = "dimming-mqtt"  # in refusal metrics and log lines; no charge point's controller


class SiteMqtt:
    """Subscribes to the dimming topic and hands its limits to :class:`~..dimming.Dimming`."""

    def __init__(
        self, settings: Settings, control: Control, dimming: Dimming, connection: MqttConnection
    ) -> None:
        self.control, self.dimming = control, dimming
        self.topic = f"{settings.mqtt_topic_prefix}set/supply_limit"
        self._closing = False
        connection.subscribe(self.topic, self._received)

    def close(self) -> None:
        """Take no more limits (shutdown has begun)."""
        self._closing = True

    def _received(self, message: Message) -> None:
        if self._closing:
            return
        try:
            ca = parse_limit(message.payload)
        except BadLimit as err:
            self.control.refused(
                INTERFACE, "bad_value", f"{self.topic} ignored: {err}", key=self.topic
            )
            return
        self.control.accepted(self.topic)
        try:
            self.dimming.set(MQTT, ca)
        except StoreError as err:  # applied all the same; only keeping it failed
            self.control.refused(
                INTERFACE, "store", f"{self.topic}: applied but not kept: {err}", key=self.topic
            )
