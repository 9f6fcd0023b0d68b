"""The openWB MQTT API's pure parts: command parsing under hypothesis, the primary's heartbeat
with a fake clock, the trees, and the get/ values."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import idle_data
from hypothesis import given
from hypothesis import strategies as st
from test_chargepoint import charging_state, connected

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.config import Settings, StationConfig
from openwb_modbus_evse.control import Control
from openwb_modbus_evse.evse.protocol import Pilot
from openwb_modbus_evse.heartbeat import Heartbeat
from openwb_modbus_evse.interfaces.openwb_mqtt import (
    COMMANDS,
    PrimaryHeartbeat,
    Tree,
    get_values,
    parse_heartbeat,
    parse_set_current,
    trees_of,
)
from openwb_modbus_evse.tools.simulator import virtual_serial
from openwb_modbus_evse.view import PLUG_HOLD

MQTT = cp.ChargePointConfig(controller="openwb-mqtt")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-100, 100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


def carried_out(state: cp.State, name: str, value) -> cp.State:
    """The state after the command ``name`` with ``value``, through the control path."""
    point = _point(state)
    command = COMMANDS[name](value)
    if command is not None:
        Control(lambda: 1.0, lambda: [point]).execute("openwb-mqtt", [(point, command)])
    return point.state


@given(name=st.sampled_from(sorted(COMMANDS)), value=json_values)
def test_any_value_is_either_refused_or_leaves_a_safe_state(name, value):
    before = charging_state()
    before = replace(before, config=replace(before.config, controller="openwb-mqtt"))
    try:
        after = carried_out(before, name, value)
    except cp.Refused as refusal:
        assert refusal.kind in (cp.RefusalKind.BAD_VALUE, cp.RefusalKind.BUSY)
        return
    assert after.requested_ca == 0 or cp.MIN_CURRENT_CA <= after.requested_ca <= cp.MAX_CURRENT_CA
    assert after.phase_target in (None, 1, 3)
    assert cp.offered_pwm(after) in (cp.PWM_OFF, *range(cp.MIN_CHARGING_PWM, 54))
    if after.sequence is not None:  # only the two one-shot commands start one, and stop first
        assert name in ("trigger_phase_switch", "cp_interruption_duration")
        assert after.sequence.stage is cp.Stage.STOPPING and cp.offered_pwm(after) == cp.PWM_OFF


@pytest.mark.parametrize(
    ("value", "centiamps"), [(0, 0), (6, 600), (13.45, 1345), (16, 1600), (32, 3200), (6.0, 600)]
)
def test_set_current_takes_amperes_as_int_or_float(value, centiamps):
    assert parse_set_current(value) == centiamps


@pytest.mark.parametrize(
    "value", [-1, -16, 0.5, 5.99, 32.01, 100, True, "16", None, [16], float("nan"), float("inf")]
)
def test_set_current_refuses_discharge_gaps_and_wrong_types(value):
    with pytest.raises(cp.Refused) as err:
        parse_set_current(value)
    assert err.value.kind is cp.RefusalKind.BAD_VALUE


def test_one_shot_false_or_zero_changes_nothing():
    assert COMMANDS["trigger_phase_switch"](False) is None
    assert COMMANDS["cp_interruption_duration"](0) is None


def test_a_command_from_the_wrong_interface_is_refused():
    s = replace(connected(), config=replace(connected().config, controller="modbus"))
    with pytest.raises(cp.Refused) as err:
        cp.check_writer(s, "openwb-mqtt")
    assert err.value.kind is cp.RefusalKind.NOT_CONTROLLER
    cp.check_writer(s, "modbus")  # its own controller passes


# --- the primary's heartbeat ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_counts_live_timestamps_that_change_whatever_the_primary_clock_says():
    clock, changes = Clock(), []
    hb = PrimaryHeartbeat("", Heartbeat(80, clock, changes.append, lapsed=True))
    assert hb.clock.lapsed  # nothing charges before the first live heartbeat
    assert not hb.received(1e9, retained=True)  # a replay sets the baseline only
    assert hb.clock.lapsed and changes == []
    assert not hb.received(1e9, retained=False)  # live, but the same: a duplicate
    assert hb.received(1e9 + 10, retained=False)  # changed: fresh
    assert not hb.clock.lapsed and changes == [False]
    clock.now += 79
    assert hb.received(1e9 + 11 - 600, retained=False)  # the primary's clock stepped back
    clock.now += 79
    assert not hb.clock.check()  # still alive: 79 s after that one
    # One far-future timestamp from any client of the broker stops nothing afterwards.
    assert hb.received(4102444800, retained=False)
    for step in range(1, 4):
        clock.now += 10
        assert hb.received(1e9 + 11 - 600 + 10 * step, retained=False)
    assert changes == [False] and not hb.clock.lapsed
    clock.now += 80
    assert hb.clock.check() and changes == [False, True]  # 80 s after the last one
    assert hb.received(1e9 + 500, retained=False) and changes == [False, True, False]


def test_parse_heartbeat():
    assert parse_heartbeat({"heartbeat": 1795257564.29, "parent_ip": "x"}) == 1795257564.29
    for bad in ({"heartbeat": "1"}, {"heartbeat": True}, {}, 5, None, {"heartbeat": float("nan")}):
        with pytest.raises(cp.Refused):
            parse_heartbeat(bad)


# --- trees ---------------------------------------------------------------------------------


def test_default_trees_are_lp1_and_lp2_as_an_openwb_duo():
    assert trees_of(Settings()) == [Tree("", 0, lp=1), Tree("", 1, lp=2)]


def test_configured_trees_take_precedence_over_the_defaults():
    a, b = virtual_serial(1), virtual_serial(2)
    settings = Settings(
        station=(
            StationConfig(serial=a, lp=3, duo_num=0),  # takes duo 0 from LP1
            StationConfig(serial=b, lp=2, mqtt_prefix="lp3/"),  # LP2 lives elsewhere
        )
    )
    assert trees_of(settings) == [Tree("", 0, serial=a), Tree("lp3/", 0, serial=b)]


# --- get/ values ---------------------------------------------------------------------------


def _point(state: cp.State) -> cp.ChargePoint:
    point = cp.ChargePoint(
        cp.Identity(serial=virtual_serial(1), lp=1, name="LP1", serial_number="SN"), state.config
    )
    point.state = state
    return point


def test_values_of_a_charging_station():
    s = cp.observe(
        cp.set_current(connected(MQTT, pilot=Pilot.B_9V), 1600, 0),
        idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True, currents_ma=(15_600, 15_550, 0)),
        1,
    )
    values = get_values(_point(s), Tree("", 0, lp=1), 1.5)
    assert values["charge_state"] is True and values["plug_state"] is True
    assert values["currents"] == [15.6, 15.55, 0.0] and values["phases_in_use"] == 2
    assert values["power"] == round(230 * 15.6 + 230 * 15.55, 2)
    assert values["evse_current"] == 15.6 and values["max_evse_current"] == 32
    assert (values["fault_state"], values["fault_str"]) == (0, "")
    json.dumps(values)  # all of it is JSON


def test_stale_data_are_a_warning_with_zeros_and_the_plug_held_then_an_error():
    s = cp.observe(
        connected(MQTT, pilot=Pilot.C_6V),
        idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True, currents_ma=(16_000,) * 3),
        1,
    )
    point = _point(s)
    values = get_values(point, Tree("", 0, lp=1), 1 + point.max_data_age + 0.1)
    assert values["fault_state"] == 1 and "no valid data" in values["fault_str"]
    assert values["plug_state"] is True  # held: a Wi-Fi hiccup does not end the session
    assert values["charge_state"] is False and values["power"] == 0 and values["phases_in_use"] == 0
    later = get_values(point, Tree("", 0, lp=1), 1 + PLUG_HOLD + 0.1)
    assert later["fault_state"] == 2 and later["plug_state"] is False
    missing = get_values(None, Tree("", 1, lp=2), 0)
    assert missing["fault_state"] == 2 and "no station is LP2" in missing["fault_str"]


def test_warnings_say_why_charging_does_not_happen():
    s = replace(connected(MQTT, pilot=Pilot.B_9V), heartbeat_lapsed=True)
    lapsed = get_values(_point(s), Tree("", 0, lp=1), 0)
    assert lapsed["fault_state"] == 1 and "heartbeat" in lapsed["fault_str"]
    modbus = get_values(_point(connected(pilot=Pilot.B_9V)), Tree("", 0, lp=1), 0)
    assert modbus["fault_state"] == 1 and "modbus" in modbus["fault_str"]
    fault = get_values(_point(connected(MQTT, pilot=Pilot.FAULT)), Tree("", 0, lp=1), 0)
    assert fault["fault_state"] == 2 and "state E" in fault["fault_str"]
