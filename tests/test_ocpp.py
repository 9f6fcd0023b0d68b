"""OCPP 1.6J: the service's stations as charge points of a central system written with the same
``ocpp`` library (tests/ocpp_central.py), and of one from PyPI (ocpp-csms), over real websockets
on loopback."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import websockets
from aiohttp import web
from conftest import eventually, free_port, metric, station_config
from ocpp.v16 import call
from ocpp_central import Csms
from test_mqtt_connection import _tls_files

from openwb_modbus_evse.interfaces.http.status import status_json
from openwb_modbus_evse.tools.simulator import VehicleConfig

pytestmark = pytest.mark.slow
UNPLUGGED = VehicleConfig(plug_in_after=None, reaction_s=0.05)


@pytest.fixture
def settings(settings):
    """Reconnects within a second: the tests kill and restart central systems."""
    return replace(settings, ocpp_reconnect_max=1.0)


@pytest.fixture
async def csms():
    server = Csms()
    await server.start()
    yield server
    await server.stop()


def ocpp_station(index: int, lp: int, **kw):
    return station_config(index, lp, name=f"cp{index}", **kw)


async def test_boot_status_heartbeat(make_rig, settings, csms):
    csms.heartbeat_interval = 1
    rig = await make_rig(settings, ocpp_url=csms.url(), station=(ocpp_station(1, 1),))
    await rig.station(1, UNPLUGGED)
    await csms.charge_point("cp1")
    boot = csms.of("BootNotification", "cp1")[0]
    assert boot["charge_point_vendor"] == "Dehne"
    assert boot["charge_box_serial_number"] == rig.stations[0].serial[-25:]
    await csms.wait("Heartbeat", 1, "cp1", timeout=5)
    await eventually(
        lambda: any(
            s["connector_id"] == 1 and s["status"] == "Available"
            for s in csms.of("StatusNotification", "cp1")
        )
    )
    service = rig.bridge
    assert metric(service, "openwb_modbus_evse_ocpp_up", name="cp1") == 1
    assert metric(service, "openwb_modbus_evse_ocpp_queue_length", name="cp1") == 0
    sent = metric(
        service,
        "openwb_modbus_evse_ocpp_messages_total",
        direction="out",
        action="BootNotification",
        result="ok",
    )
    assert sent == 1
    card = status_json(service.snapshot())["charge_points"][0]
    assert card["ocpp"]["id"] == "cp1" and card["ocpp"]["connected"]
    assert card["ocpp"]["status"] == "Available"
    await csms.stop()
    await eventually(lambda: metric(service, "openwb_modbus_evse_ocpp_up", name="cp1") == 0)
    await eventually(
        lambda: (metric(service, "openwb_modbus_evse_ocpp_reconnects_total", name="cp1") or 0) >= 1
    )


async def test_report_only_transaction(make_rig, settings, csms):
    """A Modbus-driven station reports its session; control requests are Rejected."""
    rig = await make_rig(settings, ocpp_url=csms.url(), station=(ocpp_station(1, 1),))
    station = await rig.station(1, UNPLUGGED)
    cs = await csms.charge_point("cp1")
    station.plug_in()
    start = (await csms.wait("StartTransaction", 1, "cp1"))[0]
    assert start["id_tag"] == "openwb-modbus-evse"
    assert start["connector_id"] == 1
    await eventually(
        lambda: (
            any(s["status"] == "Preparing" for s in csms.of("StatusNotification", "cp1"))
            or any(
                s["status"].startswith("Suspended") for s in csms.of("StatusNotification", "cp1")
            )
        )
    )
    result = await cs.call(call.RemoteStopTransaction(transaction_id=1001))
    assert result.status == "Rejected"
    result = await cs.call(
        call.SetChargingProfile(
            connector_id=1,
            cs_charging_profiles={
                "chargingProfileId": 1,
                "stackLevel": 0,
                "chargingProfilePurpose": "TxDefaultProfile",
                "chargingProfileKind": "Relative",
                "chargingSchedule": {
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 0}],
                },
            },
        )
    )
    assert result.status == "Rejected"
    station.unplug()
    stop = (await csms.wait("StopTransaction", 1, "cp1"))[0]
    assert stop["transaction_id"] == 1001
    assert stop["reason"] == "EVDisconnected"
    assert stop["meter_stop"] >= start["meter_start"]


def tx_default(limit: float, *, profile_id: int = 1, unit: str = "A", level: int = 0, **extra):
    return {
        "chargingProfileId": profile_id,
        "stackLevel": level,
        "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit, **extra}],
        },
    }


def offers(station, amps: float) -> bool:
    """The station's PWM offers ``amps`` (to its 1 % duty-cycle steps)."""
    return abs(offered(station) - amps) < 0.7


def offered(station) -> float:
    from openwb_modbus_evse import chargepoint as cp

    return cp.offered_amps(station.pwm)


async def test_evcc_sequence(make_rig, settings, csms):
    """What evcc's OCPP charger does after the boot, then its pause with a 0 A profile."""
    rig = await make_rig(
        settings,
        ocpp_url=csms.url(),
        station=(ocpp_station(1, 1, controller="ocpp", max_current=16.0),),
    )
    station = await rig.station(1, UNPLUGGED)
    cs = await csms.charge_point("cp1")
    result = await cs.call(call.ChangeAvailability(connector_id=0, type="Operative"))
    assert result.status == "Accepted"
    result = await cs.call(call.GetConfiguration())
    keys = {k["key"]: k for k in result.configuration_key}
    assert keys["NumberOfConnectors"] == {
        "key": "NumberOfConnectors",
        "readonly": True,
        "value": "1",
    }
    assert "SmartCharging" in keys["SupportedFeatureProfiles"]["value"]
    measurands = [
        "Power.Active.Import",
        "Energy.Active.Import.Register",
        "Current.Import",
        "Voltage",
        "Current.Offered",
    ]
    for n in range(1, len(measurands) + 1):  # evcc tries the list, then shorter ones
        value = ",".join(measurands[:n])
        result = await cs.call(call.ChangeConfiguration(key="MeterValuesSampledData", value=value))
        assert result.status == "Accepted", value
    result = await cs.call(call.ChangeConfiguration(key="MeterValuesSampledData", value="Bogus"))
    assert result.status == "Rejected"
    result = await cs.call(call.ChangeConfiguration(key="NumberOfConnectors", value="2"))
    assert result.status == "Rejected"  # read-only
    result = await cs.call(call.ChangeConfiguration(key="NoSuchKey", value="2"))
    assert result.status == "NotSupported"
    result = await cs.call(call.ChangeConfiguration(key="MeterValueSampleInterval", value="1"))
    assert result.status == "Accepted"
    result = await cs.call(call.TriggerMessage(requested_message="MeterValues", connector_id=1))
    assert result.status == "Accepted"
    values = (await csms.wait("MeterValues", 1, "cp1"))[0]
    sampled = {(v["measurand"], v.get("phase")) for v in values["meter_value"][0]["sampled_value"]}
    assert ("Current.Import", "L1") in sampled and ("Current.Offered", None) in sampled
    assert ("Voltage", "L3-N") in sampled
    result = await cs.call(call.TriggerMessage(requested_message="StatusNotification"))
    assert result.status == "Accepted"
    result = await cs.call(
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=tx_default(0))
    )
    assert result.status == "Accepted"
    station.plug_in()
    await csms.wait("StartTransaction", 1, "cp1")
    await asyncio.sleep(0.5)
    assert not station.contactor and offered(station) == 0  # paused: nothing offered
    await eventually(lambda: csms.of("StatusNotification", "cp1")[-1]["status"] == "SuspendedEVSE")
    result = await cs.call(
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=tx_default(10))
    )
    assert result.status == "Accepted"
    await eventually(lambda: offers(station, 10) and station.contactor)
    await eventually(lambda: csms.of("StatusNotification", "cp1")[-1]["status"] == "Charging")
    result = await cs.call(
        call.SetChargingProfile(connector_id=1, cs_charging_profiles=tx_default(40))
    )
    assert result.status == "Accepted"
    await eventually(lambda: offers(station, 16))  # never above the station's max_current
    tx = csms.of("StartTransaction", "cp1")
    assert len(tx) == 1
    periodic = await csms.wait("MeterValues", 3, "cp1")
    assert any(m.get("transaction_id") == 1001 for m in periodic)
    result = await cs.call(call.RemoteStopTransaction(transaction_id=1001))
    assert result.status == "Accepted"
    stop = (await csms.wait("StopTransaction", 1, "cp1"))[0]
    assert stop["reason"] == "Remote"
    await eventually(lambda: offered(station) == 0 and not station.contactor)
    await eventually(lambda: csms.of("StatusNotification", "cp1")[-1]["status"] == "Finishing")


async def test_home_assistant_sequence(make_rig, settings, csms):
    """Home Assistant's ocpp integration: ChargePointMaxProfile on connector 0, then
    TxDefaultProfile; W units convert with the phases and 230 V."""
    rig = await make_rig(
        settings, ocpp_url=csms.url(), station=(ocpp_station(1, 1, controller="ocpp"),)
    )
    station = await rig.station(1)  # plugged in at once
    cs = await csms.charge_point("cp1")
    await csms.wait("StartTransaction", 1, "cp1")
    await eventually(lambda: offers(station, 32) or station.contactor)
    cp_max = {
        "chargingProfileId": 8,
        "stackLevel": 2,
        "chargingProfilePurpose": "ChargePointMaxProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 13.0}],
        },
    }
    result = await cs.call(call.SetChargingProfile(connector_id=0, cs_charging_profiles=cp_max))
    assert result.status == "Accepted"
    await eventually(lambda: offers(station, 13))
    # 3 phases * 230 V * 8 A = 5520 W: below the ChargePointMaxProfile's 13 A
    result = await cs.call(
        call.SetChargingProfile(
            connector_id=0, cs_charging_profiles=tx_default(5520, profile_id=9, unit="W")
        )
    )
    assert result.status == "Accepted"
    await eventually(lambda: offers(station, 8))
    composite = await cs.call(call.GetCompositeSchedule(connector_id=1, duration=3600))
    assert composite.status == "Accepted"
    assert composite.charging_schedule["charging_schedule_period"][0]["limit"] == 8.0
    result = await cs.call(call.ClearChargingProfile(id=9))
    assert result.status == "Accepted"
    await eventually(lambda: offers(station, 13))
    result = await cs.call(call.ClearChargingProfile(id=99))
    assert result.status == "Unknown"


async def test_transactions_survive_outage_and_restart(make_rig, settings, csms):
    """The central system dies mid-transaction; the service restarts meanwhile; when the central
    system is back every transaction message arrives once, in order, with the right ids and
    meter values (the second transaction was started and queued while it was away)."""
    settings = replace(
        settings,
        evse_port=free_port(),  # the station reconnects to the restarted service
        ocpp_url=csms.url(),
        ocpp_offline_start=True,
        station=(ocpp_station(1, 1, controller="ocpp", max_current=16.0),),
    )
    rig = await make_rig(settings)
    station = await rig.station(1, UNPLUGGED)
    cs = await csms.charge_point("cp1")
    result = await cs.call(call.ChangeConfiguration(key="MeterValueSampleInterval", value="1"))
    assert result.status == "Accepted"
    station.plug_in()
    first = (await csms.wait("StartTransaction", 1, "cp1"))[0]
    await eventually(lambda: station.contactor)
    await csms.wait("MeterValues", 1, "cp1")
    await csms.stop()  # killed mid-transaction
    await asyncio.sleep(1.5)
    await rig.bridge.stop()  # the service restarts while the central system is away
    rig = await make_rig(settings)
    rig.stations.append(station)  # stopped with this rig
    await eventually(lambda: station.serial in rig.bridge.link.sessions)
    await asyncio.sleep(1.5)
    station.unplug()
    await asyncio.sleep(0.6)
    station.plug_in()  # a new transaction, started offline (ocpp_offline_start)
    await eventually(lambda: station.contactor)
    await asyncio.sleep(1.5)
    link = rig.bridge.ocpp.links[station.serial]
    assert len(link.queue) >= 4  # Stop, Start, MeterValues of both
    await csms.start()  # back on the same port
    await csms.wait("StartTransaction", 2, "cp1", timeout=15)
    await csms.wait("StopTransaction", 1, "cp1")
    await eventually(lambda: not link.queue, timeout=10)
    tx_messages = [
        r
        for r in csms.received
        if r.action in ("StartTransaction", "StopTransaction", "MeterValues")
        and (r.action != "MeterValues" or r.payload.get("transaction_id") is not None)
    ]
    starts = [r.payload for r in tx_messages if r.action == "StartTransaction"]
    stops = [r.payload for r in tx_messages if r.action == "StopTransaction"]
    assert len(starts) == 2 and len(stops) == 1
    assert starts[0] == first
    assert stops[0]["transaction_id"] == 1001 and stops[0]["reason"] == "EVDisconnected"
    # In order: tx 1001's start, its meter values, its stop; then tx 1002's.
    order = [(r.action, r.payload.get("transaction_id")) for r in tx_messages]
    stop_at = order.index(("StopTransaction", 1001))
    assert all(tx == 1001 for action, tx in order[1:stop_at])
    assert order[stop_at + 1] == ("StartTransaction", None)
    assert all(tx == 1002 for _, tx in order[stop_at + 2 :])
    assert order.count(("StopTransaction", 1001)) == 1
    # Meter values of tx 1001 rise and end at its meterStop; tx 1002 starts there.
    energy = [
        float(v["value"])
        for r in tx_messages
        if r.action == "MeterValues" and r.payload["transaction_id"] == 1001
        for mv in r.payload["meter_value"]
        for v in mv["sampled_value"]
        if v.get("measurand", "Energy.Active.Import.Register") == "Energy.Active.Import.Register"
    ]
    assert len(energy) >= 3 and energy == sorted(energy)
    assert first["meter_start"] <= energy[0] and energy[-1] <= stops[0]["meter_stop"] + 1
    assert starts[1]["meter_start"] >= stops[0]["meter_stop"]
    timestamps = [
        r.payload.get("timestamp") or r.payload["meter_value"][0]["timestamp"] for r in tx_messages
    ]
    assert timestamps == sorted(timestamps)


class RawCsms:
    """A central system that speaks raw frames: accepts the boot, then a test sends anything."""

    def __init__(self) -> None:
        self.frames: dict[str, asyncio.Queue] = {}
        self.sockets: dict[str, object] = {}
        self.connections: dict[str, int] = {}
        self.server = None
        self.bad_boot = False

    async def start(self) -> None:
        self.server = await websockets.serve(
            self._handler,
            "127.0.0.1",
            0,
            subprotocols=[websockets.Subprotocol("ocpp1.6")],
            max_size=None,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handler(self, ws) -> None:
        ident = ws.request.path.rsplit("/", 1)[-1]
        self.connections[ident] = self.connections.get(ident, 0) + 1
        queue = self.frames.setdefault(ident, asyncio.Queue())
        self.sockets[ident] = ws
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame[0] == 2:  # the charge point's calls: accepted
                    payload = {}
                    if frame[2] == "BootNotification" and ident == "cp2" and self.bad_boot:
                        payload = {"status": "Sure", "interval": "soon"}  # breaks the schema
                        if self.connections[ident] % 2:  # and an error code nobody knows
                            await ws.send(json.dumps([4, frame[1], "Oops", "?", {}]))
                            continue
                    elif frame[2] == "BootNotification":
                        payload = {
                            "currentTime": "2026-01-01T00:00:00Z",
                            "interval": 300,
                            "status": "Accepted",
                        }
                    elif frame[2] == "Heartbeat":
                        payload = {"currentTime": "2026-01-01T00:00:00Z"}
                    await ws.send(json.dumps([3, frame[1], payload]))
                else:
                    queue.put_nowait(frame)
        except websockets.ConnectionClosed:
            pass

    async def ask(self, ident: str, raw: str, timeout: float = 5.0):
        await self.sockets[ident].send(raw)
        return await asyncio.wait_for(self.frames[ident].get(), timeout)

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_bad_input_from_the_central_system(make_rig, settings, caplog):
    raw = RawCsms()
    await raw.start()
    try:
        rig = await make_rig(
            settings,
            ocpp_url=f"ws://127.0.0.1:{raw.port}/ocpp",
            station=(
                ocpp_station(1, 1, controller="ocpp"),
                ocpp_station(2, 2, controller="ocpp"),
            ),
        )
        await rig.station(1, UNPLUGGED)
        await rig.station(2, UNPLUGGED)
        await eventually(lambda: "cp1" in raw.sockets and "cp2" in raw.sockets)
        ok = json.dumps([2, "ok", "GetConfiguration", {"key": ["NumberOfConnectors"]}])
        assert (await raw.ask("cp1", ok))[0] == 3
        # Not JSON: nothing to answer to; the connection carries on.
        await raw.sockets["cp1"].send("{{{ not json")
        assert (await raw.ask("cp1", ok))[0] == 3
        # Unknown actions, a known one not supported, schema-invalid payloads: CallErrors.
        for n in range(20):  # invented actions: one label, not one each
            reply = await raw.ask("cp1", json.dumps([2, f"u{n}", f"NoSuchAction{n}", {}]))
            assert reply[:3] == [4, f"u{n}", "NotSupported"]
        messages = rig.bridge.ocpp.counters.messages
        assert messages[("in", "unknown", "NotSupported")] == 20
        assert not any(action.startswith("NoSuch") for _, action, _ in messages)
        reply = await raw.ask("cp1", json.dumps([2, "u2", "GetDiagnostics", {"location": "x"}]))
        assert reply[:3] == [4, "u2", "NotImplemented"]
        bad = [2, "u3", "SetChargingProfile", {"connectorId": "one", "csChargingProfiles": {}}]
        reply = await raw.ask("cp1", json.dumps(bad))
        assert reply[0] == 4 and reply[1] == "u3"
        assert reply[2] in (
            "TypeConstraintViolation",
            "FormationViolation",
            "OccurenceConstraintViolation",
        )
        reply = await raw.ask(
            "cp1", json.dumps([2, "u4", "ChangeAvailability", {"connectorId": 1}])
        )
        assert reply[:2] == [4, "u4"]
        for n, frame in enumerate(
            [
                [2, "t1", ["GetConfiguration"], {}],
                [2, "t2", 5, {}],
                [2, "t3", "GetConfiguration", []],
            ]
        ):
            reply = await raw.ask("cp1", json.dumps(frame))
            assert reply[:3] == [4, f"t{n + 1}", "FormationViolation"], reply
        await raw.sockets["cp1"].send(json.dumps([2, {"id": 1}, "Heartbeat", {}]))  # no answer
        assert (await raw.ask("cp1", ok))[:2] == [3, "ok"]
        reply = await raw.ask("cp1", json.dumps([7, "u5", "Heartbeat", {}]))
        assert reply[:2] == [4, "u5"]
        # A flood of calls: every one answered in turn, nothing piles up.
        ws = raw.sockets["cp1"]
        for n in range(300):
            await ws.send(
                json.dumps([2, f"f{n}", "GetConfiguration", {"key": ["HeartbeatInterval"]}])
            )
        answers = [await asyncio.wait_for(raw.frames["cp1"].get(), 10) for _ in range(300)]
        assert [a[1] for a in answers] == [f"f{n}" for n in range(300)]
        # Results nobody asked for are dropped.
        for n in range(100):
            await ws.send(json.dumps([3, f"r{n}", {}]))
        link = rig.bridge.ocpp.links[rig.stations[0].serial]
        assert (await raw.ask("cp1", ok))[0] == 3
        assert link._peer is not None and link._peer._response_queue.qsize() == 0
        # An answer that breaks the schema: logged (no traceback), the connection starts anew.
        raw.bad_boot = True
        await raw.sockets["cp2"].close()
        await eventually(lambda: raw.connections["cp2"] >= 4, timeout=10)
        assert "Traceback" not in caplog.text
        assert "TypeConstraintViolation" in caplog.text or "FormationViolation" in caplog.text
        raw.bad_boot = False
        cp2 = rig.bridge.ocpp.links[rig.stations[1].serial]
        await eventually(lambda: cp2.up, timeout=10)  # booted (on the 4th or 5th connection)
        await asyncio.sleep(0.3)
        cp2_connections = raw.connections["cp2"]
        # 1 MB: the connection is closed (message too big); the station reconnects; the other
        # station's connection is untouched.
        await ws.send(
            json.dumps([2, "big", "DataTransfer", {"vendorId": "x", "data": "x" * 1_000_000}])
        )
        await eventually(lambda: raw.connections["cp1"] == 2, timeout=10)
        assert raw.connections["cp2"] == cp2_connections
        assert (await raw.ask("cp2", ok))[0] == 3
    finally:
        await raw.stop()


async def test_security_profiles_1_and_2(make_rig, settings, tmp_path):
    """Basic auth with a per-station password, over TLS with the CA file."""
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Csms(passwords={"cp1": "right-password", "cp2": "right-password"})
    await server.start(ssl=context)
    try:
        rig = await make_rig(
            settings,
            ocpp_url=server.url("wss"),
            ocpp_ca_file=str(ca),
            station=(
                ocpp_station(1, 1, ocpp_password="right-password"),
                ocpp_station(2, 2, ocpp_password="wrong-password"),
            ),
        )
        await rig.station(1, UNPLUGGED)
        await rig.station(2, UNPLUGGED)
        await server.charge_point("cp1")
        await asyncio.sleep(1.0)
        assert "cp2" not in server.connected and not server.of("BootNotification", "cp2")
        assert rig.bridge.ocpp.links[rig.stations[1].serial].reconnects >= 1
    finally:
        await server.stop()


async def test_availability_stays_across_a_restart(make_rig, settings, csms):
    settings = replace(
        settings,
        evse_port=free_port(),
        ocpp_url=csms.url(),
        station=(ocpp_station(1, 1, controller="ocpp"),),
    )
    rig = await make_rig(settings)
    station = await rig.station(1)
    cs = await csms.charge_point("cp1")
    await eventually(lambda: station.contactor)
    result = await cs.call(call.ChangeAvailability(connector_id=0, type="Inoperative"))
    assert result.status == "Accepted"
    await eventually(lambda: not station.contactor and offered(station) == 0)
    stop = (await csms.wait("StopTransaction", 1, "cp1"))[0]
    assert stop["reason"] == "Other"
    await eventually(lambda: csms.of("StatusNotification", "cp1")[-1]["status"] == "Unavailable")
    result = await cs.call(call.RemoteStartTransaction(id_tag="someone"))
    assert result.status == "Rejected"
    await rig.bridge.stop()
    rig = await make_rig(settings)
    rig.stations.append(station)
    cs = await csms.charge_point("cp1")
    await eventually(lambda: station.serial in rig.bridge.link.sessions)
    await asyncio.sleep(1.0)
    assert not station.contactor and offered(station) == 0  # still inoperative
    assert len(csms.of("StartTransaction", "cp1")) == 1
    result = await cs.call(call.ChangeAvailability(connector_id=1, type="Operative"))
    assert result.status == "Accepted"
    await csms.wait("StartTransaction", 2, "cp1")  # still plugged in: a new transaction
    await eventually(lambda: station.contactor)


async def test_remote_start_reset_unlock_and_offline_plug(make_rig, settings, csms):
    """Without ocpp_offline_start a plug-in while the central system is away starts nothing;
    the transaction starts when it is back. RemoteStart takes its id tag; Reset ends the
    transaction and boots again; UnlockConnector is NotSupported."""
    await csms.stop()
    rig = await make_rig(
        settings, ocpp_url=csms.url(), station=(ocpp_station(1, 1, controller="ocpp"),)
    )
    station = await rig.station(1)  # plugged in, central system away
    await asyncio.sleep(1.0)
    assert not station.contactor and offered(station) == 0
    link = rig.bridge.ocpp.links[station.serial]
    assert link.tx is None and not link.queue
    await csms.start()
    cs = await csms.charge_point("cp1", timeout=15)
    start = (await csms.wait("StartTransaction", 1, "cp1"))[0]
    assert start["id_tag"] == "openwb-modbus-evse"
    await eventually(lambda: station.contactor)
    result = await cs.call(call.UnlockConnector(connector_id=1))
    assert result.status == "NotSupported"
    result = await cs.call(call.RemoteStartTransaction(id_tag="busy"))
    assert result.status == "Rejected"  # a transaction runs
    result = await cs.call(call.Reset(type="Soft"))
    assert result.status == "Accepted"
    stop = (await csms.wait("StopTransaction", 1, "cp1"))[0]
    assert stop["reason"] == "SoftReset"
    await csms.wait("BootNotification", 2, "cp1")
    # Booted again with the vehicle still plugged in: a new transaction (plugged = start).
    again = (await csms.wait("StartTransaction", 2, "cp1"))[1]
    cs = csms.connected["cp1"]
    # The station has the central system's answer (the transaction id) before it is stopped.
    await eventually(lambda: (link.tx or {}).get("id") == csms.tx_given[-1])
    result = await cs.call(call.RemoteStopTransaction(transaction_id=csms.tx_given[-1]))
    assert result.status == "Accepted"
    await eventually(lambda: not station.contactor)
    result = await cs.call(call.RemoteStartTransaction(id_tag="remote-tag", connector_id=1))
    assert result.status == "Accepted"
    third = (await csms.wait("StartTransaction", 3, "cp1"))[2]
    assert third["id_tag"] == "remote-tag" and again["id_tag"] == "openwb-modbus-evse"
    await eventually(lambda: station.contactor)


async def test_update_firmware(make_rig, settings, csms):
    """UpdateFirmware: downloaded from the location, sent with the existing firmware update,
    each step a FirmwareStatusNotification; a location that fails is DownloadFailed."""
    image = bytes(range(256)) * 100
    app = web.Application()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=image)

    app.router.add_get("/fw.bin", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        rig = await make_rig(
            settings, ocpp_url=csms.url(), station=(ocpp_station(1, 1, controller="ocpp"),)
        )
        station = await rig.station(1, UNPLUGGED, firmware_after_update=5)
        cs = await csms.charge_point("cp1")
        now = datetime.now(UTC).isoformat()
        await cs.call(
            call.UpdateFirmware(location=f"http://127.0.0.1:{port}/fw.bin", retrieve_date=now)
        )
        await eventually(
            lambda: (
                [s["status"] for s in csms.of("FirmwareStatusNotification", "cp1")]
                == ["Downloading", "Downloaded", "Installing", "Installed"]
            ),
            timeout=20,
        )
        assert station.uploads == [image] and station.firmware == 5
        await cs.call(
            call.UpdateFirmware(
                location=f"http://127.0.0.1:{port}/missing.bin", retrieve_date=now, retries=1
            )
        )
        await eventually(
            lambda: csms.of("FirmwareStatusNotification", "cp1")[-1]["status"] == "DownloadFailed"
        )
        result = await cs.call(call.TriggerMessage(requested_message="FirmwareStatusNotification"))
        assert result.status == "Accepted"
        await csms.wait("FirmwareStatusNotification", 7, "cp1")
        assert csms.of("FirmwareStatusNotification", "cp1")[-1]["status"] == "DownloadFailed"
    finally:
        await runner.cleanup()


async def test_profiles_run_on_time_and_survive_a_restart_without_the_central_system(
    make_rig, settings, csms
):
    """A schedule changes the current at its period boundary by itself; after a restart with
    the central system away the stored profiles still apply (ocpp_offline_start)."""
    settings = replace(
        settings,
        evse_port=free_port(),
        ocpp_url=csms.url(),
        ocpp_offline_start=True,
        station=(ocpp_station(1, 1, controller="ocpp"),),
    )
    rig = await make_rig(settings)
    station = await rig.station(1)
    cs = await csms.charge_point("cp1")
    await csms.wait("StartTransaction", 1, "cp1")
    now = datetime.now(UTC)
    absolute = {
        "chargingProfileId": 3,
        "stackLevel": 1,
        "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "startSchedule": now.isoformat(),
            "chargingSchedulePeriod": [
                {"startPeriod": 0, "limit": 0},
                {"startPeriod": 2, "limit": 10},
            ],
        },
    }
    result = await cs.call(call.SetChargingProfile(connector_id=1, cs_charging_profiles=absolute))
    assert result.status == "Accepted"
    await eventually(lambda: offered(station) == 0 and not station.contactor)
    # The next evaluation is scheduled at the period boundary (polls would only catch it late
    # on a station polled every few seconds).
    timer = rig.bridge.ocpp.links[station.serial]._timer
    assert timer is not None
    assert 0 < timer.when() - asyncio.get_running_loop().time() <= 2.1
    await eventually(lambda: offers(station, 10) and station.contactor, timeout=5)
    await csms.stop()
    await rig.bridge.stop()
    rig = await make_rig(settings)
    rig.stations.append(station)
    await eventually(lambda: station.serial in rig.bridge.link.sessions)
    await eventually(lambda: offers(station, 10) and station.contactor, timeout=5)
    assert not rig.bridge.ocpp.links[station.serial].up


async def test_against_the_published_ocpp_csms(make_rig, settings):
    """The same station against ocpp-csms from PyPI (a central system for Home Assistant
    integrations): boot, status, a transaction with meter values, a profile, remote stop."""
    from ocpp_csms import AvailabilityType, CentralSystem, TransactionStoppedEvent

    events = []
    async with CentralSystem(host="127.0.0.1", port=0, ping_interval=None) as central:
        central.add_listener(events.append)
        rig = await make_rig(
            settings,
            ocpp_url=f"ws://127.0.0.1:{central.port}/ocpp",
            station=(ocpp_station(1, 1, controller="ocpp", max_current=16.0),),
        )
        station = await rig.station(1)  # plugged in at once
        await eventually(lambda: "cp1" in central.charge_points)
        point = central.charge_points["cp1"]
        await eventually(lambda: point.boot is not None and point.get_transaction(1) is not None)
        assert point.boot.vendor == "Dehne" and point.boot.model == "Dehne-EVSE"
        await eventually(lambda: point.connectors[1].status in ("Charging", "SuspendedEV"))
        result = await point.async_change_configuration("MeterValueSampleInterval", "1")
        assert result == "Accepted"
        await eventually(lambda: point.get_meter_reading(1, "Energy.Active.Import.Register"))
        result = await point.async_call(
            call.SetChargingProfile(connector_id=1, cs_charging_profiles=tx_default(8))
        )
        assert result.status == "Accepted"
        await eventually(lambda: offers(station, 8))
        tx = point.get_transaction(1)
        result = await point.async_remote_stop_transaction(tx.transaction_id)
        assert result == "Accepted"
        await eventually(lambda: any(isinstance(e, TransactionStoppedEvent) for e in events))
        stopped = next(e for e in events if isinstance(e, TransactionStoppedEvent))
        assert stopped.transaction.stop_reason == "Remote"
        assert stopped.transaction.meter_stop >= stopped.transaction.meter_start
        await eventually(lambda: offered(station) == 0)
        result = await point.async_change_availability(0, AvailabilityType.INOPERATIVE)
        assert result == "Accepted"
        await eventually(lambda: point.connectors[1].status == "Unavailable")
