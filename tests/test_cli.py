"""The command line as users run it: simulate against a live link, help and version."""

import asyncio
import importlib.util
import signal
import subprocess
import sys

import click
from click.testing import CliRunner
from conftest import eventually

from openwb_modbus_evse import config
from openwb_modbus_evse.cli import main, serve
from openwb_modbus_evse.evse.link import StationLink
from openwb_modbus_evse.tools.simulator import virtual_serial

CLI = [sys.executable, "-m", "openwb_modbus_evse"]


async def test_simulate_connects_count_stations_and_stops_cleanly_on_sigint():
    link = StationLink("127.0.0.1", 0, poll_interval=0.5)
    await link.start()
    proc = subprocess.Popen(
        [
            *CLI,
            "simulate",
            "--bridge",
            f"127.0.0.1:{link.port}",
            "--count",
            "3",
            "--firmware",
            "2",
            "--plug-in-after",
            "0",
            "--vehicle-phases",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await eventually(lambda: len(link.sessions) == 3, timeout=10)
        assert sorted(link.sessions) == [virtual_serial(i) for i in (1, 2, 3)]
        session = link.session(virtual_serial(2))
        assert session.firmware == 2
        await eventually(lambda: session.latest.pilot.plugged, timeout=5)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=10)[0]
        await link.close()
    assert proc.returncode == 0 and "Traceback" not in output


def test_simulate_refuses_a_serial_with_a_count():
    done = subprocess.run(
        [*CLI, "simulate", "--serial", "AB" * 16, "--count", "2"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2 and "--serial names one station" in done.stderr


def test_every_command_has_help_and_the_version_is_printed():
    for command in ("serve", "simulate", "status", "registers", "demo", "config-reference"):
        done = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True, timeout=20)
        assert done.returncode == 0 and "Usage:" in done.stdout, command
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=20)
    assert "0.1.0" in done.stdout


def test_serve_runs_on_uvloop_when_installed_else_on_asyncio(monkeypatch):
    from openwb_modbus_evse import cli

    loops = []

    async def probe():
        loops.append(type(asyncio.get_running_loop()).__module__)

    installed = importlib.util.find_spec("uvloop") is not None
    cli._run_service(probe())
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    cli._run_service(probe())
    assert loops[0].startswith("uvloop" if installed else "asyncio")
    assert loops[1].startswith("asyncio")


def test_serve_options_are_typed_and_explained_by_the_settings_table():
    options = {param.name: param for param in serve.params}
    assert tuple(options["controller"].type.choices) == config.CONTROLLERS
    assert options["unit_id"].type is click.INT and options["poll_interval"].type is click.FLOAT
    assert options["stop_charging_on_shutdown"].type is click.BOOL
    assert options["stop_charging_on_shutdown"].help.endswith("(true/false).  [default: true]")
    # address lists and serials are typed comma-separated, their defaults shown so
    assert options["modbus_allow"].type is click.STRING
    assert options["modbus_allow"].help.endswith("[default: 0.0.0.0/0,::/0]")
    assert options["known_stations"].type is click.STRING
    assert options["state_db"].help.endswith(f"[default: {config.default_state_db()}]")


def test_lp_arguments_stop_at_max_lp():
    beyond = str(config.MAX_LP + 1)
    for args in (["registers", "--lp", beyond], ["move", "AB" * 16, beyond]):
        done = CliRunner().invoke(main, args)
        assert done.exit_code == 2 and f"1<=x<={config.MAX_LP}" in done.output, args
    assert CliRunner().invoke(main, ["registers", "--lp", str(config.MAX_LP)]).exit_code == 0


def test_config_reference_prints_docs_configuration_md():
    done = CliRunner().invoke(main, ["config-reference"])
    assert done.exit_code == 0 and done.output == config.reference_markdown()
