"""The MQTT connection manager against a real mosquitto: retained values, reconnects, wills."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
from conftest import Broker, eventually, require_tool

from openwb_modbus_evse.mqtt.connection import Message, MqttConnection, MqttSettings

FAST = (0.05, 0.2)  # backoff for tests


async def read_retained(port: int, topic_filter: str, seconds: float = 0.5) -> dict[str, bytes]:
    """What a fresh client sees under ``topic_filter`` within ``seconds`` (retained only)."""
    seen: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic_filter)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for message in client.messages:
                    seen[message.topic.value] = bytes(message.payload)
    return seen


async def publish(port: int, topic: str, payload: bytes | str, retain: bool = True) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(topic, payload, retain=retain)


async def started(port: int, **kw) -> MqttConnection:
    conn = MqttConnection(MqttSettings("127.0.0.1", port), backoff=FAST, **kw)
    await conn.start()
    return conn


async def test_retained_values_survive_a_broker_restart_and_messages_reach_handlers(broker):
    conn = MqttConnection(MqttSettings("127.0.0.1", broker.port), backoff=FAST, client_id="t1")
    conn.publish("svc/a", "1", retain=True)  # before connecting: kept, sent on connect
    received: list[Message] = []
    conn.subscribe("cmd/#", received.append)
    connects: list[bool] = []
    conn.on_connect(lambda: connects.append(conn.connected))
    await conn.start()
    try:
        await eventually(lambda: conn.connected)
        conn.publish("svc/b", b'"x"', retain=True)
        await eventually(lambda: conn.messages_out >= 2)
        assert await read_retained(broker.port, "svc/#") == {"svc/a": b"1", "svc/b": b'"x"'}

        await publish(broker.port, "cmd/old", "r")
        await eventually(lambda: len(received) == 1)
        assert received[0] == Message("cmd/old", b"r", False)  # live: retain flag cleared
        await publish(broker.port, "other/x", "ignored")

        await broker.restart()  # forgets every retained value
        await eventually(lambda: not conn.connected)
        conn.publish("svc/a", "2", retain=True)  # while disconnected: remembered
        conn.publish("svc/b", "", retain=True)  # deleted: not sent again
        conn.publish("svc/live", "dropped")  # not retained, disconnected: dropped
        await eventually(lambda: conn.connected and conn.connects == 2)
        assert connects == [True, True]
        await eventually(lambda: not conn._outbox_retained)
        assert await read_retained(broker.port, "svc/#") == {"svc/a": b"2"}
        assert conn.messages_dropped == 1

        await publish(broker.port, "cmd/new", "n")  # re-subscribed after the restart
        await eventually(lambda: len(received) == 2)
        assert received[1].topic == "cmd/new"
        assert all(m.topic.startswith("cmd/") for m in received)
        assert conn.messages_in == 2
    finally:
        await conn.stop()
    assert not conn.connected


async def test_a_new_subscriber_gets_a_retained_replay_marked_retained(broker):
    await publish(broker.port, "cmd/x", "1")
    received: list[Message] = []
    conn = await started(broker.port, client_id="t2")
    try:
        conn.subscribe("cmd/x", received.append)  # subscribing while connected works too
        await eventually(lambda: received)
        assert received == [Message("cmd/x", b"1", True)]
    finally:
        await conn.stop()


async def test_a_subscriber_ends_with_the_latest_value_of_a_topic(broker):
    """A live value (a re-publish for a restarted Home Assistant) and then a newer retained one
    for the same topic, in one loop turn: the subscriber's last message is the newer one (the
    retained ones go out first; the older live one must not come after it)."""
    conn = await started(broker.port, client_id="t-order")
    seen: list[bytes] = []
    try:
        await eventually(lambda: conn.connected)
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe("state/x")

            async def read() -> None:
                async for message in client.messages:
                    seen.append(bytes(message.payload))

            reader = asyncio.create_task(read())
            await asyncio.sleep(0.1)  # subscribed
            conn.publish("state/x", "old")
            conn.publish("other/y", "live")
            conn.publish("state/x", "new", retain=True)
            await eventually(lambda: conn.messages_out >= 2 and seen)
            await asyncio.sleep(0.2)
            reader.cancel()
        assert seen[-1] == b"new", seen
        assert conn.messages_out == 2  # the other topic's live message still went out
    finally:
        await conn.stop()


async def test_reconnects_with_backoff_while_the_broker_is_away(broker):
    broker.stop()
    conn = await started(broker.port, client_id="t3")
    try:
        await asyncio.sleep(0.5)
        assert not conn.connected
        await broker.start()
        await eventually(lambda: conn.connected, timeout=5)
    finally:
        await conn.stop()


WILL_HOLDER = """
import asyncio, sys
from openwb_modbus_evse.mqtt.connection import MqttConnection, MqttSettings
async def main():
    conn = MqttConnection(MqttSettings("127.0.0.1", int(sys.argv[1])), client_id="will-test")
    for i in range(3):
        conn.add_will(f"w/{i}", "2")
        conn.publish(f"w/{i}", "0", retain=True)
    await conn.start()
    while not conn.connected or conn._outbox_retained:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the will clients connect too
    print("ready", flush=True)
    if sys.argv[2] == "stop":
        await conn.stop()
        print("stopped", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def _will_holder(port: int, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WILL_HOLDER, str(port), mode], stdout=subprocess.PIPE, text=True
    )
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line.strip() == "ready"
    return proc


async def test_every_will_fires_when_the_process_dies(broker):
    proc = await _will_holder(broker.port, "kill")
    try:
        assert await read_retained(broker.port, "w/#") == {f"w/{i}": b"0" for i in range(3)}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await asyncio.sleep(0.3)
        assert await read_retained(broker.port, "w/#") == {f"w/{i}": b"2" for i in range(3)}
    finally:
        proc.kill()
        proc.wait()


async def test_no_will_fires_on_a_clean_stop(broker):
    proc = await _will_holder(broker.port, "stop")
    try:
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "stopped"
        proc.kill()
        proc.wait()
        await asyncio.sleep(0.3)
        assert await read_retained(broker.port, "w/#") == {f"w/{i}": b"0" for i in range(3)}
    finally:
        proc.kill()
        proc.wait()


async def test_the_service_connects_when_mqtt_host_is_set_and_not_otherwise(
    broker, settings, make_rig
):
    off = await make_rig(settings)
    assert off.bridge.mqtt is None
    await off.close()
    rig = await make_rig(broker.settings(settings))
    mqtt = rig.bridge.mqtt
    assert mqtt is not None
    await eventually(lambda: mqtt.connected)
    await rig.bridge.stop()
    assert not mqtt.connected


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 signed by it (made with the openssl command)."""
    openssl = require_tool("openssl")
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    run = lambda *args: subprocess.run([openssl, *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", ca_key, "-out", ca)  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key,
        "-out", csr)  # fmt: skip
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
        "-extfile", ext, "-out", cert)  # fmt: skip
    return ca, cert, key


async def test_tls_and_login(tmp_path, caplog):
    ca, cert, key = _tls_files(tmp_path)
    passwords = tmp_path / "passwords"
    subprocess.run(
        [require_tool("mosquitto_passwd"), "-b", "-c", passwords, "evse", "s3cret"], check=True
    )
    broker = Broker(
        tmp_path,
        f"allow_anonymous false\npassword_file {passwords}\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
    )
    await broker.start()
    good = MqttSettings("127.0.0.1", broker.port, "evse", "s3cret", str(ca))
    bad_password = MqttSettings("127.0.0.1", broker.port, "evse", "wrong", str(ca))
    no_tls = MqttSettings("127.0.0.1", broker.port, "evse", "s3cret", "")
    conns = [
        MqttConnection(s, backoff=FAST, client_id=f"c{i}")
        for i, s in enumerate((good, bad_password, no_tls))
    ]
    try:
        for conn in conns:
            conn.publish("svc/x", "1", retain=True)
            await conn.start()
        await eventually(lambda: conns[0].connected and not conns[0]._outbox_retained)
        await asyncio.sleep(0.5)  # the others kept trying meanwhile
        assert not conns[1].connected and not conns[2].connected
        # The refused login: one warning, not one per attempt. (Plain TCP to the TLS listener
        # only times out, after 10 s.)
        failures = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(failures) == 1 and "Not authorized" in failures[0], failures
    finally:
        for conn in conns:
            await conn.stop()
        broker.stop()
