"""The supply limit in the running service: real virtual stations, a real Modbus client."""

from __future__ import annotations

import asyncio

from conftest import eventually

from openwb_modbus_evse.chargepoint import offered_amps
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.tools.simulator import VehicleConfig

ADDR = REGISTER_MAP.address
VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)


class Watch:
    """Samples what the stations really offer, every few milliseconds."""

    def __init__(self, stations) -> None:
        self.stations = stations
        self.peak = 0.0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, sum(offered_amps(s.pwm) for s in self.stations))
            await asyncio.sleep(0.002)

    def stop(self) -> None:
        self._task.cancel()


async def offered(client, lp: int) -> float:
    rr = await client.read_input_registers(ADDR(lp, "offered_current"), count=1, device_id=1)
    assert not rr.isError()
    return REGISTER_MAP.decode([0] * 16 + rr.registers + [0] * 83)["offered_current"]


async def test_two_stations_share_16_a_and_one_gets_all_when_the_other_leaves(make_rig, settings):
    rig = await make_rig(settings, supply_max_current=16)
    client = await rig.client()
    one = await rig.station(1, VEHICLE)
    watch = Watch([one])
    for lp in (1, 2):
        rr = await client.write_register(ADDR(lp, "set_current"), 1600, device_id=1)
        assert lp == 2 or not rr.isError()
    await one.wait_for(lambda s: s.pwm == 26 and s.contactor)  # alone: 15.6 A
    two = await rig.station(2, VEHICLE)
    watch.stations.append(two)
    rr = await client.write_register(ADDR(2, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    # shared: 8 A each, so PWM 13 (7.8 A); one is lowered before the other is raised
    await two.wait_for(lambda s: s.pwm == 13 and s.contactor)
    await one.wait_for(lambda s: s.pwm == 13)
    await eventually(lambda: rig.point(two.serial).state.data.pwm == 13)
    assert await offered(client, 1) == await offered(client, 2) == 7.8
    # the controller asks for more: the limit holds
    rr = await client.write_register(ADDR(1, "set_current"), 3200, device_id=1)
    assert not rr.isError()
    await asyncio.sleep(0.5)
    assert (one.pwm, two.pwm) == (13, 13)
    # one leaves: the other gets the whole supply
    two.unplug()
    await one.wait_for(lambda s: s.pwm == 26, timeout=5)
    await eventually(lambda: rig.point(one.serial).state.data.pwm == 26)
    assert await offered(client, 1) == 15.6
    watch.stop()
    assert watch.peak <= 16.0


async def test_who_cannot_get_6_a_waits_with_pwm_100(make_rig, settings):
    rig = await make_rig(settings, supply_max_current=10)
    client = await rig.client()
    one = await rig.station(1, VEHICLE)
    two = await rig.station(2, VEHICLE)
    for lp in (1, 2):
        rr = await client.write_register(ADDR(lp, "set_current"), 1600, device_id=1)
        assert not rr.isError()
    # 10 A do not make 2 x 6 A: one charges with 9.6 A, the other waits
    await eventually(lambda: sorted((one.pwm, two.pwm)) == [16, 100], timeout=5)
    await asyncio.sleep(0.5)
    assert sorted((one.pwm, two.pwm)) == [16, 100]
    granted = {rig.point(s.serial).state.supply_cap_ca for s in (one, two)}
    assert granted == {0, 1000}
