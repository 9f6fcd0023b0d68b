"""The service's connection to an MQTT broker, shared by every MQTT interface.

What an interface uses (all from the event loop's thread):

- ``subscribe(topic_filter, handler)``: ``handler(Message)`` is called for every message whose
  topic matches; subscriptions are (re)made on every connect, so call it any time.
- ``publish(topic, payload, retain=...)``: never blocks. A retained value is remembered and
  published again after every reconnect (an empty retained payload deletes the topic and is
  forgotten); a non-retained message is sent if connected and dropped otherwise (counted).
- ``on_connect(callback)``: called after every (re)connect, once the subscriptions are made;
  ``on_disconnect(callback)``: after every loss of the connection (not on ``stop``).
- ``connected``, ``messages_in``, ``messages_out``, ``messages_dropped``: for metrics.

Last wills (``add_will`` before ``start``): a broker keeps one will per client, so the first will
rides on the main client and each further one on its own small client that only holds the will.
A will client that reconnects has its topic's remembered value published again (its will may
have fired).
Clients have fixed identifiers, so a restarted service takes over the old sessions at once:
their wills fire before the new values are published, never after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

log = logging.getLogger(__name__)
# paho logs every failed attempt; the reconnect loop says it once, with the reason.
_client_log = logging.getLogger(f"{__name__}.client")
_client_log.setLevel(logging.CRITICAL)

MAX_PAYLOAD = 16 * 1024  # bytes; larger incoming messages are dropped unread
MAX_INCOMING = 1000  # messages waiting to be handled; more are dropped by the client
MAX_OUTGOING = 1000  # non-retained messages waiting for the broker; the oldest go first
KEEPALIVE = 30  # s; the broker fires the wills after 1.5 times this without a packet
CONNECT_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 10.0


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and how to log in; ``ca_file`` set means TLS."""

    host: str
    port: int = 1883
    username: str = ""
    password: str = ""
    ca_file: str = ""


@dataclass(frozen=True)
class Message:
    """A message received on a subscribed topic; ``retain`` is set for retained replays."""

    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Will:
    """A retained message the broker publishes when the service's connection dies."""

    topic: str
    payload: bytes


Handler = Callable[[Message], None]


class MqttConnection:
    """Keeps the service connected to one broker; see the module docstring."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str = "openwb-modbus-evse",
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.settings = settings
        self.wills: list[Will] = []
        self.client_id = client_id
        self._backoff = backoff
        self._subscriptions: dict[str, list[Handler]] = {}
        self._connect_callbacks: list[Callable[[], None]] = []
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._retained: dict[str, bytes] = {}  # what the broker should hold, by topic
        self._outbox_retained: dict[str, bytes] = {}  # retained values still to send
        self._outbox: deque[tuple[str, bytes]] = deque(maxlen=MAX_OUTGOING)
        self._wake = asyncio.Event()
        self._client: aiomqtt.Client | None = None  # the main client while connected
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribing: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.connected = False
        self.connects = 0
        self.messages_in = 0
        self.messages_out = 0
        self.messages_dropped = 0

    # --- the interface's side -------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Call ``handler`` for every message matching ``topic_filter`` (MQTT wildcards)."""
        new = topic_filter not in self._subscriptions
        self._subscriptions.setdefault(topic_filter, []).append(handler)
        if new and self._client is not None:
            task = asyncio.create_task(self._subscribe_now(self._client, topic_filter))
            self._subscribing.add(task)
            task.add_done_callback(self._subscribing.discard)

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every (re)connect."""
        self._connect_callbacks.append(callback)

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every loss of the connection (not when stopped)."""
        self._disconnect_callbacks.append(callback)

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        """Send a QoS 0 message; see the module docstring for what happens while disconnected."""
        data = payload.encode() if isinstance(payload, str) else payload
        if retain:
            if data and self._retained.get(topic) == data and topic not in self._outbox_retained:
                return  # the broker holds it already
            if data:
                self._retained[topic] = data
            else:
                self._retained.pop(topic, None)
            if not self.connected:
                return  # sent with every other retained value on connect
            self._outbox_retained[topic] = data
            # Retained values go out first: a live one for the same topic that still waits is
            # older, and sent after it would leave subscribers with the old value (while the
            # broker holds the new one, which is then never sent again).
            if any(t == topic for t, _ in self._outbox):
                kept = [(t, d) for t, d in self._outbox if t != topic]
                self._outbox = deque(kept, maxlen=MAX_OUTGOING)
        elif self.connected:
            if len(self._outbox) == self._outbox.maxlen:
                self.messages_dropped += 1
            self._outbox.append((topic, data))
        else:
            self.messages_dropped += 1
            return
        self._wake.set()

    def add_will(self, topic: str, payload: bytes | str) -> None:
        """Have the broker publish ``payload`` retained to ``topic`` if the service dies."""
        data = payload.encode() if isinstance(payload, str) else payload
        self.wills.append(Will(topic, data))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background (returns at once; reconnects until stopped)."""
        self._tasks = [asyncio.create_task(self._run_main())]
        self._tasks += [asyncio.create_task(self._hold_will(w)) for w in self.wills[1:]]

    async def stop(self) -> None:
        """Send what is waiting, then disconnect cleanly (no will fires); idempotent."""
        if self._client is not None and (self._outbox or self._outbox_retained):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    while self._client is not None and (self._outbox or self._outbox_retained):
                        await asyncio.sleep(0.01)
        self._stopping = True
        tasks, self._tasks = [*self._tasks, *self._subscribing], []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- inside ---------------------------------------------------------------------------

    @property
    def _address(self) -> tuple[str, int]:
        return self.settings.host, self.settings.port

    def _client_for(self, index: int, will: Will | None) -> aiomqtt.Client:
        s = self.settings
        tls = None
        if s.ca_file:
            tls = ssl.create_default_context(cafile=s.ca_file)
        return aiomqtt.Client(
            s.host,
            s.port,
            username=s.username or None,
            password=s.password or None,
            identifier=self.client_id if index == 0 else f"{self.client_id}-will{index}",
            clean_session=True,
            will=aiomqtt.Will(will.topic, will.payload, qos=1, retain=True) if will else None,
            keepalive=KEEPALIVE,
            timeout=CONNECT_TIMEOUT,
            tls_context=tls,
            max_queued_incoming_messages=MAX_INCOMING,
            # Small messages both ways: without this, Nagle and delayed ACKs add ~40 ms per hop.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
            logger=_client_log,
        )

    async def _reconnecting(self, name: str, session: Callable[[], object]) -> None:
        """Run ``session()`` (a coroutine function) again and again with backoff."""
        delay, failures = self._backoff[0], 0
        while True:
            try:
                await session()  # type: ignore[misc]
                delay, failures = self._backoff[0], 0
            except (aiomqtt.MqttError, OSError, ssl.SSLError) as err:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "MQTT %s to %s:%d: %s; retrying (every %g s at most)",
                    name,
                    *self._address,
                    str(err) or type(err).__name__,
                    self._backoff[1],
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])

    async def _run_main(self) -> None:
        await self._reconnecting("connection", self._main_session)

    async def _main_session(self) -> None:
        will = self.wills[0] if self.wills else None
        async with self._client_for(0, will) as client:
            self._client = client
            self.connected = True
            self.connects += 1
            log.info("MQTT: connected to %s:%d", *self._address)
            try:
                await self._subscribe(client, list(self._subscriptions))
                self._outbox_retained = dict(self._retained)  # the broker may have lost them
                self._outbox.clear()
                self._wake.set()
                for callback in self._connect_callbacks:
                    callback()
                sender = asyncio.create_task(self._send(client))
                try:
                    await self._receive(client)
                finally:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await sender
            finally:
                self._client = None
                self.connected = False
                if not self._stopping:
                    log.warning("MQTT: connection to %s:%d lost", *self._address)
                    for callback in self._disconnect_callbacks:
                        try:
                            callback()
                        except Exception:  # one bad callback must not stop the reconnects
                            log.exception("MQTT: disconnect callback failed")

    async def _subscribe(self, client: aiomqtt.Client, filters: list[str]) -> None:
        if filters:
            await client.subscribe([(f, 0) for f in filters])

    async def _subscribe_now(self, client: aiomqtt.Client, topic_filter: str) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # lost meanwhile: made on the reconnect
            await self._subscribe(client, [topic_filter])

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.messages_in += 1
            payload = message.payload
            if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_PAYLOAD:
                self.messages_dropped += 1
                continue
            received = Message(message.topic.value, bytes(payload), bool(message.retain))
            for topic_filter, handlers in list(self._subscriptions.items()):
                if message.topic.matches(topic_filter):
                    for handler in handlers:
                        try:
                            handler(received)
                        except Exception:  # one bad handler must not end the connection
                            log.exception("MQTT: handler for %s failed", received.topic)

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox_retained or self._outbox:
                if self._outbox_retained:
                    topic = next(iter(self._outbox_retained))
                    payload, retain = self._outbox_retained.pop(topic), True
                else:
                    (topic, payload), retain = self._outbox.popleft(), False
                await client.publish(topic, payload, qos=0, retain=retain, timeout=PUBLISH_TIMEOUT)
                self.messages_out += 1
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Python 3.11's asyncio.wait_for (inside publish) swallows a cancellation
                    # that comes as the publish completes: this task would then wait for the
                    # next wake forever, and the session's end (and stop()) with it.
                    raise asyncio.CancelledError

    async def _hold_will(self, will: Will) -> None:
        index = self.wills.index(will)

        async def session() -> None:
            async with self._client_for(index, will) as client:
                value = self._retained.get(will.topic)
                if value is not None:  # the will may have fired while this client was away
                    self._outbox_retained[will.topic] = value
                    self._wake.set()
                await client.messages.__anext__()  # nothing comes; returns on disconnect

        await self._reconnecting(f"will client {index}", session)
