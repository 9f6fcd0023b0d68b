"""The broker connection's sender ends when cancelled, even when the cancellation is swallowed
inside a publish (Python 3.11's asyncio.wait_for does that when the publish completes at the
same moment): otherwise the session's end and stop() wait for it forever."""

from __future__ import annotations

import asyncio

from openwb_modbus_evse.mqtt.connection import MqttConnection, MqttSettings


class SwallowingClient:
    """A client whose publish, when cancelled, returns as if it had completed."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def publish(self, *args, **kwargs) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return  # the cancellation is lost here, as in wait_for's race


async def test_a_cancellation_swallowed_by_publish_still_ends_the_sender():
    connection = MqttConnection(MqttSettings("127.0.0.1"))
    connection.connected = True
    connection.publish("topic", b"payload")  # one message waiting
    client = SwallowingClient()
    sender = asyncio.create_task(connection._send(client))  # type: ignore[arg-type]
    await asyncio.wait_for(client.entered.wait(), 1)
    sender.cancel()
    done, _ = await asyncio.wait({sender}, timeout=1)
    assert sender in done and sender.cancelled()
