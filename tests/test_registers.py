"""register_map.csv is the single source of truth; the encoding follows the openWB table."""

import csv
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from openwb_modbus_evse.cli import main
from openwb_modbus_evse.interfaces.modbus import registers as r
from openwb_modbus_evse.interfaces.modbus.server import WRITE_COMMANDS
from openwb_modbus_evse.view import PLUG_HOLD

ROOT = Path(__file__).resolve().parents[1]
M = r.REGISTER_MAP


def test_csv_has_one_row_per_register_of_the_openwb_table():
    with open(ROOT / "register_map.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["offset", "name", "type", "access", "scale", "unit", "description"]
    offsets = {int(row["offset"]): row for row in rows}
    # The openWB Rev2.0 table, LP-relative (../shared/seeds/openwb-api-secondary-mode.txt).
    assert sorted(offsets) == [
        0,
        2,
        4,
        5,
        6,
        7,
        8,
        9,
        14,
        15,
        16,
        20,
        21,
        30,
        31,
        32,
        40,
        41,
        43,
        50,
        60,
        71,
        80,
        81,
        90,
        97,
        98,
        99,
    ]
    assert {o for o, row in offsets.items() if row["access"] == "W"} == {71, 80, 81, 90, 97, 98, 99}
    assert {o for o, row in offsets.items() if row["type"] == "int32"} == {0, 2, 21, 41}
    assert len({row["name"] for row in rows}) == len(rows)


def test_packaged_copy_is_the_same_file():
    packaged = ROOT / "openwb_modbus_evse" / "interfaces" / "modbus" / "register_map.csv"
    assert packaged.read_bytes() == (ROOT / "register_map.csv").read_bytes()


def test_every_writable_register_has_a_handler_except_the_pro_only_update():
    writable = {reg.name for reg in M.registers if reg.writable}
    assert set(WRITE_COMMANDS) == writable - {"force_update"}


def test_no_register_number_is_written_in_the_code():
    literal = re.compile(r"\b10[1-9]\d\d\b")
    for path in (ROOT / "openwb_modbus_evse").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not literal.search(line), f"{path.name}:{number}: {line.strip()}"


def test_int32_is_high_word_first_and_strings_two_characters_per_register():
    block = M.encode({"power": 70000, "serial_number": "ABCDE"})
    assert block[0:2] == [0x0001, 0x1170]  # 70000 = 0x00011170
    assert block[50:54] == [0x4142, 0x4344, 0x4500, 0]
    assert M.decode(block)["serial_number"] == "ABCDE"


def test_invalid_and_out_of_range_values_are_minus_one():
    block = M.encode({"power": None, "voltage_l1": None, "current_l1": 400.0})
    assert block[0:2] == [0xFFFF, 0xFFFF]
    assert block[M["voltage_l1"].offset] == 0xFFFF
    assert block[M["current_l1"].offset] == 0xFFFF  # 40000 does not fit int16


def test_write_only_and_unknown_offsets_read_as_zero():
    block = M.encode({name: 1 for name in ("set_current", "heartbeat")})
    assert block[M["set_current"].offset] == 0 and block[10:14] == [0, 0, 0, 0]


def valid(bits: int):
    """Every value an int register can carry except -1, which means "invalid"."""
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).filter(lambda n: n != r.INVALID)


@given(valid(16), valid(32))
def test_numbers_round_trip(small, big):
    values = M.decode(M.encode({"power_l1": small, "energy_imported": big}))
    assert values["power_l1"] == small and values["energy_imported"] == big


def test_minus_one_reads_back_as_invalid():
    assert M.decode(M.encode({"power_l1": -1, "energy_imported": -1}))["power_l1"] is None


def test_registers_command_prints_every_register_with_its_lp_address():
    result = CliRunner().invoke(main, ["registers", "--lp", "2"])
    assert result.exit_code == 0
    for reg in M.registers:
        assert reg.name in result.output
        assert str(r.lp_base(2) + reg.offset) in result.output


def test_readme_register_table_is_generated_from_the_csv():
    generated = CliRunner().invoke(main, ["registers", "--markdown"]).output.strip()
    assert generated in (ROOT / "docs" / "registers.md").read_text()


@pytest.mark.parametrize("lp", [1, 9])
def test_lp_blocks(lp):
    assert r.lp_base(lp) == 10000 + 100 * lp
    assert M.address(lp, "set_current") == 10000 + 100 * lp + 71


def test_block_encoder_reuses_a_block_until_what_it_shows_changes():
    from conftest import idle_data

    from openwb_modbus_evse import chargepoint as cp

    point = cp.ChargePoint(
        cp.Identity("A" * 32, 1, "LP1", "WB1"), cp.ChargePointConfig(), max_data_age=15
    )
    point.observe(idle_data(), 100.0)
    encoder = r.BlockEncoder()
    first = encoder.block(point, 100.0)
    assert encoder.block(point, 101.0) is first  # nothing changed: no work
    point.observe(idle_data(voltages_mv=(231_000, 230_000, 230_000)), 102.0)
    second = encoder.block(point, 102.0)
    assert M.decode(second)["voltage_l1"] == 231.0
    point.energy.wh = 5.7
    assert M.decode(encoder.block(point, 103.0))["energy_imported"] == 5
    stale = encoder.block(point, 102.0 + 16)  # older than max_data_age: no-data values
    assert M.decode(stale)["voltage_l1"] is None and M.decode(stale)["energy_imported"] == 5


# --- what a charge point without fresh data serves ------------------------------------------


def _point():
    from openwb_modbus_evse import chargepoint as cp

    return cp.ChargePoint(
        cp.Identity("A" * 32, 1, "LP1", "WB1"), cp.ChargePointConfig(), max_data_age=15
    )


def _charging_data():
    from conftest import idle_data

    from openwb_modbus_evse.evse.protocol import Pilot

    return idle_data(pilot=Pilot.C_6V, pwm=26, contactor=True, currents_ma=(15_600,) * 3)


def served_at(point, energy_wh, now):
    point.energy.wh = float(energy_wh)
    return r.chargepoint_values(point, now)


def test_no_fresh_data_serves_0_for_what_clients_add_up_and_holds_the_plug_state():
    point = _point()
    point.observe(_charging_data(), 100.0)
    point.energy.wh = 1234.0
    served = served_at(point, 1234, 100.0)
    assert served["power"] > 0 and served["charging"] == 1 and served["plugged"] == 1

    point.disconnected(101.0, "gone")
    for now in (101.0, 100.0 + PLUG_HOLD):  # a WiFi hiccup: the session goes on
        values = M.decode(M.encode(served_at(point, 1234, now)))
        assert values["plugged"] == 1, now
        assert values["charging"] == values["offered_current"] == 0
        for name in ("power", "power_l1", "power_l2", "power_l3"):
            assert values[name] == 0, name
        for name in ("current_l1", "current_l2", "current_l3"):
            assert values[name] == 0, name
        for name in ("voltage_l1", "voltage_l2", "voltage_l3"):
            assert values[name] is None, name  # -1: unknown, and no client adds voltages up
        assert values["energy_imported"] == 1234

    later = M.decode(M.encode(served_at(point, 1234, 100.1 + PLUG_HOLD)))
    assert later["plugged"] == 0 and later["power"] == 0 and later["voltage_l1"] is None


def test_stale_data_of_a_connected_but_silent_station_follows_the_same_rule():
    point = _point()
    point.observe(_charging_data(), 100.0)
    values = M.decode(M.encode(served_at(point, 0, 100.0 + 16)))
    assert point.state.connected
    assert values["plugged"] == 1 and values["power"] == 0 and values["voltage_l1"] is None


def test_a_station_never_seen_serves_plugged_0():
    values = M.decode(M.encode(served_at(_point(), 7, 5.0)))
    assert values["plugged"] == 0 and values["power"] == 0 and values["energy_imported"] == 7


def test_block_encoder_notices_the_end_of_the_plug_hold():
    point = _point()
    point.observe(_charging_data(), 100.0)
    point.disconnected(100.0, "gone")
    encoder = r.BlockEncoder()
    assert M.decode(encoder.block(point, 200.0))["plugged"] == 1
    assert M.decode(encoder.block(point, 100.0 + PLUG_HOLD + 1))["plugged"] == 0


def test_the_register_table_states_the_no_data_rule_the_code_follows():
    """Every readable register whose description states a no-data value serves that value."""
    point = _point()
    point.observe(_charging_data(), 100.0)
    point.disconnected(100.0, "gone")
    offline = M.decode(M.encode(served_at(point, 42, 110.0)))
    stated = {"0 without fresh data": 0, "-1 without fresh data": None}
    checked = set()
    for reg in M.readable:
        for phrase, expected in stated.items():
            if reg.description.endswith(phrase):
                assert offline[reg.name] == expected, reg.name
                checked.add(reg.name)
    summed = {"power", "power_l1", "power_l2", "power_l3", "current_l1", "current_l2"}
    assert summed | {"current_l3", "voltage_l1", "charging", "offered_current"} <= checked
    assert f"for up to {PLUG_HOLD:g} s" in M["plugged"].description
    assert offline["plugged"] == 1
    energy = M["energy_imported"].description
    assert "uint32" in energy and "evcc" in energy and "Home Assistant" in energy
    assert offline["energy_imported"] == 42
