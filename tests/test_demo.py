"""make demo: live values change in `status` and in /metrics."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port

CLI = [sys.executable, "-m", "openwb_modbus_evse"]


def status_json(port: int) -> list[dict]:
    done = subprocess.run(
        [*CLI, "status", "--port", str(port), "--json"], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def metric(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith(name + "{")
    }


@pytest.mark.slow
def test_demo_shows_live_values_in_status_and_metrics(tmp_path):
    evse, modbus, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            *CLI,
            "demo",
            "--evse-port",
            str(evse),
            "--modbus-port",
            str(modbus),
            "--metrics-port",
            str(metrics),
            "--state-db",
            str(tmp_path / "demo.sqlite3"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        rows = []
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                rows = status_json(modbus)
            except AssertionError:
                continue
            if len(rows) == 2 and all(r["charging"] for r in rows):
                break
        assert [r["lp"] for r in rows] == [1, 2] and all(r["charging"] for r in rows), rows
        first_power = metric(metrics, "openwb_modbus_evse_power_watts")
        assert len(first_power) == 2 and all(v > 0 for v in first_power.values())
        time.sleep(6)  # the demo's controller writes a new current every 5 s
        again = status_json(modbus)
        assert [r["voltages_v"] for r in again] != [r["voltages_v"] for r in rows]
        assert metric(metrics, "openwb_modbus_evse_power_watts") != first_power
        assert again[1]["currents_a"][1] == 0  # LP2's vehicle charges on one phase
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, proc.stderr.read()


def test_demo_with_a_port_in_use_says_so_in_one_line():
    """`make demo` while `make run` runs: serve's one-line error, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*CLI, "demo", "--evse-port", "0", "--modbus-port", str(port), "--metrics-port", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "--modbus-port" in errors[0]
