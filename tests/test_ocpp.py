"""OCPP 1.6J: the service's stations as charge points of a central system written with the same
``ocpp`` library (tests/ocpp_csms.py), over real websockets on loopback."""

from __future__ import annotations

import pytest
from conftest import eventually, station_config
from ocpp.v16 import call
from ocpp_csms import Csms

from openwb_modbus_evse.tools.simulator import VehicleConfig

pytestmark = pytest.mark.slow
UNPLUGGED = VehicleConfig(plug_in_after=None, reaction_s=0.05)


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
