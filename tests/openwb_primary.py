"""An openWB primary as openWB's own "external openWB" module talks to a secondary.

As observed (shared docs, openwb-mqtt-secondary.md): every publish is its own short MQTT 3.1.1
connection with a clean session, QoS 0, retained, JSON; reading is a fresh client subscribed to
``.../get/#`` for exactly one second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt


class Primary:
    """The primary's side of one secondary charge point (``prefix``, ``duo``)."""

    def __init__(
        self,
        port: int,
        *,
        duo: int = 0,
        prefix: str = "",
        clock_offset: float = 0.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.port, self.duo, self.prefix, self.host = port, duo, prefix, host
        self.clock_offset = clock_offset  # the primary's clock minus ours

    def topic(self, name: str) -> str:
        """A per-charge-point set topic (set_current, phases_to_use, ...)."""
        return f"{self.prefix}openWB/set/internal_chargepoint/{self.duo}/data/{name}"

    def global_topic(self, name: str) -> str:
        return f"{self.prefix}openWB/set/internal_chargepoint/{name}"

    async def publish(self, topic: str, payload: bytes | str) -> None:
        """One publish on its own connection, as the primary does."""
        async with aiomqtt.Client(self.host, self.port, clean_session=True) as client:
            await client.publish(topic, payload, qos=0, retain=True)

    async def send(self, name: str, value: Any) -> None:
        await self.publish(self.topic(name), json.dumps(value))

    def now(self) -> float:
        return time.time() + self.clock_offset

    async def heartbeat(self, timestamp: float | None = None) -> float:
        stamp = self.now() if timestamp is None else timestamp
        payload = {"heartbeat": stamp, "parent_ip": "127.0.0.1"}
        await self.publish(self.global_topic("global_data"), json.dumps(payload))
        return stamp

    async def cycle(self, amps: float) -> None:
        """One control cycle: heartbeat, parent_cp, set_current."""
        await self.heartbeat()
        await self.send("parent_cp", "3")
        await self.send("set_current", amps)

    @contextlib.asynccontextmanager
    async def beating(self, interval: float = 0.2) -> AsyncIterator[None]:
        """Heartbeats every ``interval`` seconds while inside."""

        async def beat() -> None:
            while True:
                with contextlib.suppress(aiomqtt.MqttError):  # the broker may be away a moment
                    await self.heartbeat()
                await asyncio.sleep(interval)

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            # aiomqtt on Python 3.11 may swallow a cancellation that comes while it connects
            # (its wait_for): cancel again until the task has ended.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def read(self, seconds: float = 1.0, what: str = "get/#") -> dict[str, Any]:
        """Everything under ``.../<duo>/<what>`` within ``seconds``, JSON-decoded."""
        base = f"{self.prefix}openWB/internal_chargepoint/{self.duo}/"
        strip = base + what.rstrip("#")
        return await read_json(self.port, base + what, seconds, strip=strip, host=self.host)


async def read_json(
    port: int,
    topic_filter: str,
    seconds: float,
    strip: str = "",
    host: str = "127.0.0.1",
    retained_only: bool = False,
) -> dict:
    """Messages under ``topic_filter`` (retained and live), JSON-decoded, minus ``strip``."""
    seen: dict[str, Any] = {}
    async with aiomqtt.Client(host, port, clean_session=True) as client:
        await client.subscribe(topic_filter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for message in client.messages:
                    if retained_only and not message.retain:
                        continue  # what the broker holds, not what passes by
                    payload = bytes(message.payload)
                    key = message.topic.value.removeprefix(strip)
                    seen[key] = json.loads(payload) if payload else None
    return seen
