"""Energy integration: trapezoidal, only through a closed contactor, never backwards."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openwb_modbus_evse.energy import EnergyMeter


def test_constant_power_for_an_hour_is_its_watt_hours():
    meter = EnergyMeter()
    for t in range(0, 3601, 5):
        meter.sample(11_000, True, t, max_gap=15)
    assert meter.wh == pytest.approx(11_000)


def test_trapezoid_between_samples():
    meter = EnergyMeter(wh=10)
    meter.sample(0, True, 0, max_gap=15)
    meter.sample(3600, True, 10, max_gap=15)  # ramp 0 -> 3600 W over 10 s
    assert meter.wh == pytest.approx(10 + 5.0)


def test_gaps_longer_than_the_limit_are_skipped_not_invented():
    meter = EnergyMeter()
    meter.sample(7200, True, 0, max_gap=15)
    meter.sample(7200, True, 100, max_gap=15)
    assert meter.wh == 0
    meter.interrupt()
    meter.sample(7200, True, 105, max_gap=15)
    assert meter.wh == 0


def test_open_contactor_counts_nothing():
    meter = EnergyMeter()
    for t in range(0, 60, 5):
        meter.sample(300, False, t, max_gap=15)  # sensor noise with the contactor open
    assert meter.wh == 0


@given(
    st.lists(st.tuples(st.floats(-1e5, 1e5), st.booleans(), st.floats(0, 1e6)), max_size=50),
    st.floats(0, 1e6),
)
def test_never_decreases_nor_exceeds_the_maximum_power(samples, start):
    meter = EnergyMeter(wh=start, max_power_w=22_000)
    last, last_at = meter.wh, None
    for power, contactor, at in samples:
        meter.sample(power, contactor, at, max_gap=15)
        assert meter.wh >= last
        if last_at is not None:
            assert meter.wh - last <= 22_000 * max(0.0, at - last_at) / 3600 + 1e-6
        last, last_at = meter.wh, at


def test_a_disconnect_resets_the_meter_so_no_energy_is_counted_across_it():
    """ChargePoint.disconnected interrupts the meter: the reconnect starts a new segment."""
    from conftest import idle_data

    from openwb_modbus_evse import chargepoint as cp
    from openwb_modbus_evse.evse.protocol import Pilot

    point = cp.ChargePoint(
        cp.Identity("A" * 32, 1, "LP1", "WB1"), cp.ChargePointConfig(), max_data_age=15
    )
    charging = idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True, currents_ma=(16_000,) * 3)
    point.observe(charging, 0.0)
    point.disconnected(1.0, "gone")
    point.observe(charging, 5.0)  # back within max_data_age: still no energy for 0..5 s
    assert point.energy.wh == 0
    point.observe(charging, 6.0)  # and counting goes on from the reconnect
    assert point.energy.wh == pytest.approx(charging.power_w / 3600)
