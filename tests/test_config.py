"""Configuration: every key validated, every problem one line naming the key."""

import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from openwb_modbus_evse import config
from openwb_modbus_evse.evse.protocol import Calibration

SERIAL = "10BA23AB50534D53302E3120FF162332"
SERVE = [sys.executable, "-m", "openwb_modbus_evse", "serve"]
ROOT = Path(__file__).resolve().parents[1]

GOOD = f"""
evse_host = "0.0.0.0"
evse_port = 9091
poll_interval = 2
modbus_port = 1502
unit_id = 1
state_db = "/tmp/x.db"
heartbeat_timeout = 80
stop_charging_on_shutdown = false
metrics_port = 0
log_level = "debug"

[[station]]
serial = "{SERIAL.lower()}"
lp = 2
name = "garage"
serial_number = "WB-0001"
max_current = 16
cable = "tethered"
phases = 1
phase_switch_command = "/usr/local/bin/relay --phases"
calibration = {{ u1 = [100, 3, 2], i3 = [0, 10, 1] }}
"""


def test_a_complete_file_loads_with_every_value(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    s = config.load(path)
    assert (s.evse_host, s.evse_port, s.poll_interval, s.log_level) == ("0.0.0.0", 9091, 2, "DEBUG")
    assert s.stop_charging_on_shutdown is False and s.metrics_port == 0
    (st,) = s.station
    assert st.serial == SERIAL and st.lp == 2 and st.name == "garage" and st.phases == 1
    assert st.max_current == 16.0 and st.cable == "tethered"
    assert st.calibration.voltages[0] == Calibration(100, 3, 2)
    assert st.calibration.currents[2] == Calibration(0, 10, 1)
    assert st.calibration.voltages[1] == Calibration()


def test_defaults_without_a_file():
    s = config.load(None)
    assert (s.evse_host, s.evse_port, s.modbus_host, s.modbus_port, s.unit_id) == (
        "::",
        9091,
        "0.0.0.0",
        1502,
        1,
    )
    assert (s.poll_interval, s.heartbeat_timeout, s.metrics_port) == (5.0, 80.0, 9502)
    assert s.stop_charging_on_shutdown and s.station == ()
    assert s.state_db.endswith("openwb-modbus-evse/state.sqlite3")


def test_known_stations_and_address(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        f'known_stations = ["{SERIAL.lower()}"]\n'
        f'[[station]]\nserial = "{SERIAL}"\nlp = 1\naddress = "192.168.1.7/24"\n'
    )
    s = config.load(path)
    assert s.known_stations == (SERIAL,) and s.is_known(SERIAL)
    assert str(s.station[0].address) == "192.168.1.0/24"
    other = "0" * 32
    s = config.load(None, {"known_stations": f"{SERIAL}, {other}"})  # the command line
    assert s.known_stations == (SERIAL, other) and not s.is_known("1" * 32)


def test_command_line_overrides_the_file_and_none_means_not_given(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("poll_interval = 2\nmodbus_port = 1600\n")
    s = config.load(path, {"poll_interval": 3.5, "modbus_port": None})
    assert s.poll_interval == 3.5 and s.modbus_port == 1600


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("pol_interval = 2", "pol_interval", "unknown key"),
        ("poll_interval = 10", "poll_interval", "below 10"),
        ("poll_interval = 0", "poll_interval", "above 0"),
        ('poll_interval = "5"', "poll_interval", "number"),
        ("evse_port = 70000", "evse_port", "0..65535"),
        ("unit_id = true", "unit_id", "integer"),
        ('log_level = "loud"', "log_level", "one of"),
        ("stop_charging_on_shutdown = 1", "stop_charging_on_shutdown", "true or false"),
        ("heartbeat_timeout = -5", "heartbeat_timeout", "above 0"),
        ("station = 3", "station", "array of tables"),
        ("mqtt_port = 0", "mqtt_port", "1..65535"),
        ("mqtt_host = 5", "mqtt_host", "string"),
        ('mqtt_ca_file = "/nonexistent/ca.crt"', "mqtt_ca_file", "cannot read"),
        ("mqtt_heartbeat_timeout = 0", "mqtt_heartbeat_timeout", "above 0"),
        ('unknown_stations = "ignore"', "unknown_stations", "assign, hold"),
        ('known_stations = ["ABC"]', "known_stations", "32 hex digits"),
        ('known_stations = "ABC"', "known_stations", "32 hex digits"),
        ("lp_remember_after = -1", "lp_remember_after", "at least 0"),
        ("contactor_min_off = 7200", "contactor_min_off", "at most 3600"),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\naddress = "192.168.1.300"',
            "station[0].address",
            "IP address or network",
        ),
        (f'[[station]]\nserial = "{SERIAL}"\nlp = 244', "station[0].lp", "1..243"),
        ("[[station]]\nlp = 1", "station[0].serial", "required"),
        ('controller = "iec104"', "controller", "modbus, openwb-mqtt"),
        ('controller = "ocpp"', "controller", "needs ocpp_url"),
        ('ocpp_url = "http://x/ocpp"', "ocpp_url", "ws://host:port/path"),
        (
            f'[[station]]\nserial = "{SERIAL}"\nocpp_id = "a/b"',
            "station[0].ocpp_id",
            "letters, digits",
        ),
        (
            f'ocpp_url = "ws://cs/ocpp"\n[[station]]\nserial = "{SERIAL}"\nname = "a"\n'
            f'[[station]]\nserial = "{SERIAL[:-1]}3"\nocpp_id = "a"',
            "station[1].ocpp_id",
            "already station[0]",
        ),
        ('controller = "openwb-mqtt"', "controller", "needs mqtt_host"),
        (
            f'[[station]]\nserial = "{SERIAL}"\ncontroller = "openwb-mqtt"',
            "station[0].controller",
            "needs mqtt_host",
        ),
        (f'[[station]]\nserial = "{SERIAL}"\nmqtt_prefix = "lp3"', "station[0].mqtt_prefix", "/"),
        (f'[[station]]\nserial = "{SERIAL}"\nmqtt_prefix = "#/"', "station[0].mqtt_prefix", "#"),
        (f'[[station]]\nserial = "{SERIAL}"\nduo_num = 2', "station[0].duo_num", "0..1"),
        (
            f'mqtt_host = "x"\n[[station]]\nserial = "{SERIAL}"\nmqtt_prefix = "a/"\n'
            f'[[station]]\nserial = "{SERIAL[:-1]}3"\nmqtt_prefix = "a/"\nduo_num = 0',
            "station[1].duo_num",
            "a/openWB/internal_chargepoint/0 is already station[0]",
        ),
        ('[[station]]\nserial = "ABC"\nlp = 1', "station[0].serial", "32 hex digits"),
        (f'[[station]]\nserial = "{SERIAL}"\nlp = 1\ncolor = "red"', "station[0].color", "unknown"),
        (f'[[station]]\nserial = "{SERIAL}"\nlp = 1\nphases = 2', "station[0].phases", "1, 3"),
        (f'[[station]]\nserial = "{SERIAL}"\nlp = 1\ncable = "usb"', "station[0].cable", "socket"),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\nmax_current = 40',
            "station[0].max_current",
            "32",
        ),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\nserial_number = "{"x" * 21}"',
            "station[0].serial_number",
            "20",
        ),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\ncalibration = {{ u1 = [0, 1, 0] }}',
            "station[0].calibration.u1",
            "divider",
        ),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\ncalibration = {{ u4 = [0, 1, 1] }}',
            "station[0].calibration.u4",
            "unknown",
        ),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\n'
            f'[[station]]\nserial = "{SERIAL[:-1]}3"\nlp = 1',
            "station[1].lp",
            "LP1 is already taken by station[0]",
        ),
        (
            f'[[station]]\nserial = "{SERIAL}"\nlp = 1\n[[station]]\nserial = "{SERIAL}"\nlp = 2',
            "station[1].serial",
            "already configured",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key, words):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ") and words in str(err.value)


def test_broken_toml_and_missing_file_name_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("poll_interval = = 2\n")
    with pytest.raises(config.ConfigError, match="not valid TOML") as err:
        config.load(path)
    assert err.value.key == str(path)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def run_serve(*args):
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=20)


def test_serve_stops_with_one_line_and_no_traceback(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[[station]]\nserial = "{SERIAL}"\nlp = 0\n')
    done = run_serve("--config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == "config error: station[0].lp: must be 1..243, got 0"
    assert done.stdout == ""


def test_command_line_values_are_checked_like_file_values():
    done = run_serve("--poll-interval", "12", "--check-config")
    assert done.returncode == 2
    assert done.stderr.startswith("config error: poll_interval: must be below 10 s")


def test_check_config_validates_and_exits(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    done = run_serve("--config", str(path), "--check-config")
    assert done.returncode == 0 and "1 station(s)" in done.stdout


def test_configuration_md_is_the_generated_reference():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config.reference_markdown(), "run `make docs` and commit the result"


def test_reference_example_file_loads_and_shows_every_key_at_its_default(tmp_path):
    reference = (ROOT / "docs" / "configuration.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", reference, re.DOTALL)
    path = tmp_path / "c.toml"
    path.write_text(block)
    settings = config.load(path)
    values = tomllib.loads(block)
    (station_values,) = values["station"]
    for table, shown, built in (
        (config.Settings, values, settings),
        (config.StationConfig, station_values, settings.station[0]),
    ):
        missing = {f.name for f in fields(table)} - {"station"} - set(shown)
        assert not missing, f"the example of {table.__name__} lacks {missing}"
        for key in config.keys(table):
            if key.info.example is None:
                assert getattr(built, key.name) == key.default, f"it shows {key.name} wrongly"
    # an example is there to show something other than the default
    assert settings.state_db != config.default_state_db()
    assert settings.station[0].phase_switch_command is not None


def test_admin_token_must_be_long_enough():
    assert config.build({"admin_token": "a" * 16}).admin_token == "a" * 16
    assert config.build({"admin_token": ""}).admin_token == ""
    for bad in ("short", "with a space inside it", 42):
        with pytest.raises(config.ConfigError, match="admin_token"):
            config.build({"admin_token": bad})


def test_a_station_with_only_serial_and_controller_is_valid(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        f'mqtt_host = "127.0.0.1"\n[[station]]\nserial = "{SERIAL}"\ncontroller = "openwb-mqtt"\n'
    )
    settings = config.load(path)
    assert settings.station[0].lp is None
    assert settings.controller_of(SERIAL) == "openwb-mqtt"
    assert settings.controller_of("0" * 32) == "modbus"  # the global default


def test_every_key_is_also_a_serve_option():
    from openwb_modbus_evse.cli import serve

    options = {param.name for param in serve.params}
    assert {f.name for f in fields(config.Settings)} - {"station"} <= options


def _with_command(command: str) -> config.Settings:
    return config.build({"station": [{"serial": SERIAL, "phase_switch_command": command}]})


def test_check_config_warns_about_a_phase_switch_command_that_cannot_run(tmp_path):
    script = tmp_path / "relay"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    assert config.warnings(_with_command(f"{script} --set")) == [
        f"station[0].phase_switch_command: {script} is not executable"
    ]
    missing = tmp_path / "nowhere" / "relay"
    assert config.warnings(_with_command(str(missing))) == [
        f"station[0].phase_switch_command: {missing} does not exist"
    ]
    assert config.warnings(_with_command("no-such-relay-command --set")) == [
        "station[0].phase_switch_command: no-such-relay-command does not exist"
    ]
    assert config.warnings(_with_command(str(tmp_path))) == [
        f"station[0].phase_switch_command: {tmp_path} is not executable"
    ]
    script.chmod(0o755)
    assert config.warnings(_with_command(f"{script} --set")) == []
    assert config.warnings(_with_command("sh -c true")) == []  # found on PATH

    path = tmp_path / "c.toml"
    path.write_text(f'[[station]]\nserial = "{SERIAL}"\nphase_switch_command = "{missing} --set"\n')
    done = run_serve("--config", str(path), "--check-config")
    assert done.returncode == 0 and "config OK" in done.stdout  # valid, but it will not work
    assert done.stderr == f"warning: station[0].phase_switch_command: {missing} does not exist\n"
