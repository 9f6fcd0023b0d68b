"""The first hour: what the service says at start-up about who may connect and write, the demo's
admin token, and the package installed from a built wheel, without the repository."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import free_port

from openwb_modbus_evse.config import Settings
from openwb_modbus_evse.limits import parse_networks
from openwb_modbus_evse.service import access_summary

ROOT = Path(__file__).resolve().parent.parent


def test_start_up_says_who_may_connect_and_who_may_write():
    lines = access_summary(Settings(evse_host="0.0.0.0", modbus_host="0.0.0.0"))
    assert lines[0] == "access: stations connect on every interface:9091; any station is served"
    assert lines[1] == (
        "access: Modbus on every interface:1502: everyone may connect, everyone may write (set "
        "currents, phases, pilot interruptions); restrict with modbus_allow / modbus_write_allow"
    )
    assert lines[2].endswith(
        "everyone may read the status page and /metrics; actions are off (no admin_token)"
    )
    narrow = Settings(
        modbus_allow=parse_networks(["192.168.1.0/24"]),
        modbus_write_allow=parse_networks(["192.168.1.10"]),
        unknown_stations="hold",
        admin_token="x" * 16,
    )
    lines = access_summary(narrow)
    assert "only stations in [[station]] or known_stations are served" in lines[0]
    assert "192.168.1.0/24 may connect, 192.168.1.10/32 may write" in lines[1]
    assert "restrict" not in lines[1]
    assert lines[2].endswith(
        "actions (owner's controls, move, forget, firmware) need the admin token"
    )


async def test_the_service_logs_it_at_start(make_rig, settings, caplog):
    with caplog.at_level(logging.INFO, logger="openwb_modbus_evse.service"):
        await make_rig(replace(settings, metrics_host="127.0.0.1", metrics_port=free_port()))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access: ")]
    assert len(said) == 3 and "everyone may write" in said[1], said


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer")


@pytest.mark.slow
def test_demo_prints_a_generated_admin_token(tmp_path):
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "openwb_modbus_evse",
        "demo",
        "--evse-port",
        str(free_port()),
        "--modbus-port",
        str(free_port()),
        "--metrics-port",
        str(port),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        token = None
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while token is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the demo ended"
            if "take the admin token " in line:
                token = line.split("take the admin token ")[1].split()[0]
        assert token and len(token) >= 16
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/stations", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert len(json.loads(response.read())["stations"]) <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = subprocess.run([*argv[:4], "--admin-token", "short"], capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 16 ASCII characters" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_built_wheel_installs_and_serves_without_the_repository(tmp_path):
    # A copy of the checkout: building writes build/ and egg-info next to the sources.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "__pycache__",
            "*.egg-info",
            "build",
            ".*_cache",
            ".hypothesis",
            "target",
            "bench_*",
        ),
    )
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("openwb_modbus_evse-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    command = venv / "bin" / "openwb-modbus-evse"
    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the source copy
    elsewhere.mkdir()
    shutil.rmtree(source)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere)}
    registers = subprocess.run(
        [str(command), "registers", "--lp", "1"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert registers.returncode == 0 and "set_current" in registers.stdout, registers.stderr
    http = free_port()
    proc = subprocess.Popen(
        [
            str(command),
            "serve",
            "--evse-host",
            "127.0.0.1",
            "--evse-port",
            str(free_port()),
            "--modbus-host",
            "127.0.0.1",
            "--modbus-port",
            str(free_port()),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(http),
            "--state-db",
            str(elsewhere / "state.sqlite3"),
        ],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(f"http://127.0.0.1:{http}/api/status", proc)
        status, page = _get(f"http://127.0.0.1:{http}/")
        assert status == 200 and b"<title>openwb-modbus-evse</title>" in page
        status, script = _get(f"http://127.0.0.1:{http}/app.js")
        assert status == 200 and b"Why not charging" in script
        status, body = _get(f"http://127.0.0.1:{http}/api/status")
        assert json.loads(body)["charge_points"] == []
        # Imported from the installed wheel, not from a checkout.
        where = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import openwb_modbus_evse; print(openwb_modbus_evse.__file__)",
            ],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert where.stdout.startswith(str(venv)), where.stdout
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
