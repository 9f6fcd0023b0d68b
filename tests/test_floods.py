"""What a flood of commands does to a vehicle: it sees at most a few PWM changes a second, and a
lower current still applies at once (issue 19)."""

from __future__ import annotations

import asyncio

from test_control import start_charging, write
from test_rust_bridge import commands

from openwb_modbus_evse.evse.link import PWM_RAISE_INTERVAL

assert PWM_RAISE_INTERVAL == 0.2  # the documented value: a few PWM changes a second


async def test_a_write_flood_reaches_the_vehicle_as_a_few_pwm_changes_a_second(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    station = await start_charging(rig, client, amps=16)
    since = len(station.received)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(200):  # 6 A and 16 A in turn, as fast as the client can
        assert await write(client, 1, "set_current", 600 if i % 2 else 1600) is None
    elapsed = loop.time() - started
    await asyncio.sleep(0.6)
    pwm_changes = [c for c in commands(station, since) if c[0] == "pwm"]
    # Raises are coalesced to one per 0.2 s; each is followed by at most one lowering.
    assert len(pwm_changes) <= 2 * (elapsed / PWM_RAISE_INTERVAL + 2), (len(pwm_changes), elapsed)
    assert station.pwm in (10, 26)


async def test_a_lower_current_applies_at_once_a_higher_one_after_its_interval(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    station = await start_charging(rig, client, amps=16)
    loop = asyncio.get_running_loop()
    assert await write(client, 1, "set_current", 600) is None
    lowered = loop.time()
    await station.wait_for(lambda s: s.pwm == 10, timeout=0.4)  # at once
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: s.pwm == 26, timeout=2)
    assert loop.time() - lowered >= PWM_RAISE_INTERVAL - 0.05  # the raise waited for its turn
