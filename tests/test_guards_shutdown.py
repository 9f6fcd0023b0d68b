"""Guards for the shutdown: what the service waits for before it closes the station connections.

With ``stop_charging_on_shutdown`` (the default) it waits until every connected station reports
its contactor open and PWM 100 %; without it, until every station shows the PWM it should
(a pilot interruption is ended). Each test names the mutation it kills. The stop is one call,
``rig.bridge.stop()`` (the service's stop), the rest is what the station saw.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest
from conftest import eventually, station_config
from test_control import write

from openwb_modbus_evse.tools.simulator import VehicleConfig

# A vehicle that takes 1.2 s to follow a PWM change: it keeps drawing that long after PWM 100 %.
SLOW_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=1.2, max_current_a=32)
# A vehicle that takes 30 s to follow: offered a current, it stays at B (contactor open).
IDLE_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=30.0, max_current_a=32)
FAST_VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)


async def charging(rig, vehicle: VehicleConfig, amps: int = 16):
    client = await rig.client()
    station = await rig.station(1, vehicle)
    await station.wait_for(lambda s: s.plugged)
    assert await write(client, 1, "set_current", amps * 100) is None
    return station


async def test_shutdown_waits_for_the_contactor_to_open_not_only_for_pwm_100(make_rig, settings):
    """The vehicle still draws when the station reports PWM 100 %: the service must wait until
    the contactor is open before it closes the connection.

    kills: ``_not_stopped`` ignoring the contactor (closing once PWM 100 % is reported)."""
    rig = await make_rig(settings, stop_timeout=3.0)
    station = await charging(rig, SLOW_VEHICLE)
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    await rig.bridge.stop()
    assert station.pwm == 100
    assert not station.contactor


async def test_shutdown_waits_for_pwm_100_on_a_station_whose_contactor_is_open(make_rig, settings):
    """A current is offered, the vehicle has not asked yet (contactor open): the station must
    get and confirm PWM 100 % before the connection closes (it would offer the current until its
    own safety timeout, minutes later).

    kills: ``_not_stopped`` ignoring the PWM (only a closed contactor counting)."""
    rig = await make_rig(settings)
    station = await charging(rig, IDLE_VEHICLE)
    await station.wait_for(lambda s: s.pwm == 26)
    await eventually(lambda: rig.point(station.serial).state.data.pwm == 26)  # reported
    assert not station.contactor
    await rig.bridge.stop()
    assert station.pwm == 100
    assert not station.contactor


@pytest.mark.parametrize("stop_charging", [True, False])
async def test_shutdown_does_not_wait_for_a_station_that_is_gone(
    make_rig, settings, caplog, stop_charging
):
    """A station dropped while charging: its last report shows a closed contactor, but there is
    nobody to wait for. The stop must not sit out stop_timeout + 2 s, whether it stops charging
    or leaves it.

    kills: ``_not_stopped`` counting disconnected stations (``point.state.connected`` dropped);
    ``_pwm_not_applied`` true for a station without a target (``want is None or ...``)."""
    settings = replace(settings, stop_charging_on_shutdown=stop_charging)
    rig = await make_rig(settings, stop_timeout=2.0, station=(station_config(1, lp=1),))
    station = await charging(rig, FAST_VEHICLE)
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    await eventually(lambda: rig.point(station.serial).state.data.contactor)
    await station.stop()
    await eventually(lambda: not rig.point(station.serial).state.connected)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING):
        await rig.bridge.stop()
    assert loop.time() - started < 3.0  # not stop_timeout + 2 s = 4 s
    assert not [r for r in caplog.records if "shutdown" in r.getMessage()]


async def test_shutdown_that_leaves_charging_does_not_wait_for_a_stop(make_rig, settings, caplog):
    """stop_charging_on_shutdown = false, a vehicle charging: nothing is to be applied, the
    service stops at once and the station goes on charging.

    kills: ``_pwm_not_applied`` waiting for a stop (``_not_stopped`` in its place, or comparing
    with PWM 100 %), which sits out stop_timeout + 2 s; and ``leave_charging`` stopping."""
    rig = await make_rig(settings, stop_charging_on_shutdown=False, stop_timeout=2.0)
    station = await charging(rig, FAST_VEHICLE)
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    await eventually(lambda: rig.point(station.serial).state.data.contactor)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING):
        await rig.bridge.stop()
    assert loop.time() - started < 3.0  # not stop_timeout + 2 s = 4 s
    assert not [r for r in caplog.records if "shutdown" in r.getMessage()]
    assert station.pwm == 26 and station.contactor


async def test_shutdown_that_leaves_charging_waits_until_the_interruption_has_ended(
    make_rig, settings
):
    """stop_charging_on_shutdown = false during a pilot interruption (state F): the service
    waits until the station shows the current again, never leaving it at PWM 0 %.

    kills: ``_pwm_not_applied`` never true (closing at once)."""
    rig = await make_rig(settings, stop_charging_on_shutdown=False)
    station = await charging(rig, FAST_VEHICLE)
    await station.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
    assert await write(rig.clients[0], 1, "cp_interruption", 30) is None
    await station.wait_for(lambda s: s.pwm == 0 and not s.contactor, timeout=4)
    await rig.bridge.stop()
    assert station.pwm == 26


async def test_shutdown_right_after_a_current_was_offered_still_sends_pwm_100(make_rig, settings):
    """As above, but the stop comes as soon as the station applied the PWM, before its report
    showing it has reached the service."""
    rig = await make_rig(settings)
    station = await charging(rig, IDLE_VEHICLE)
    await station.wait_for(lambda s: s.pwm == 26)
    await rig.bridge.stop()
    assert station.pwm == 100
