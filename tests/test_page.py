"""The status page in a real headless browser (Debian's chromium) against the running demo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import free_port, require_tool

CLI = [sys.executable, "-m", "openwb_modbus_evse"]
COMPARED = (
    "lp",
    "serial",
    "plugged",
    "charging",
    "offered_a",
    "currents_a",
    "power_w",
    "energy_wh",
)


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run headless chromium on ``url`` (its JavaScript gets 4 s of virtual time); stdout."""
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    argv = [
        require_tool("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=4000",
        *args,
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Cards(HTMLParser):
    """``data-field`` texts of every card, by its ``data-lp``."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[int, dict[str, str]] = {}
        self._lp: int | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("class") == "card":
            self._lp = int(a["data-lp"] or 0)
            self.cards[self._lp] = {}
        if "data-field" in a and self._lp is not None:
            self._field = a["data-field"]
            self.cards[self._lp][self._field] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("dd", "div", "span", "pre"):
            self._field = None

    def handle_data(self, data: str) -> None:
        if self._field is not None and self._lp is not None:
            self.cards[self._lp][self._field] += data


def status_json(port: int) -> list[dict]:
    done = subprocess.run(
        [*CLI, "status", "--port", str(port), "--json"], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    return [{k: row[k] for k in COMPARED} for row in json.loads(done.stdout)]


def expected_card(row: dict) -> dict[str, str]:
    """How the page shows a row of ``status --json``."""
    state = "charging" if row["charging"] else "plugged in" if row["plugged"] else "no vehicle"
    return {
        "state": state,
        "power_w": f"{row['power_w']} W",
        "currents": f"{row['offered_a']:.1f} A / ",
        "currents_a": " · ".join(f"{a:.1f}" for a in row["currents_a"]) + " A",
        "energy_wh": f"{row['energy_wh'] / 1000:.3f} kWh",
        "serial_number": row["serial"],
    }


@pytest.fixture
def demo(tmp_path):
    """The demo on free loopback ports: (modbus port, HTTP port)."""
    ports = {
        "--evse-port": free_port(),
        "--modbus-port": free_port(),
        "--metrics-port": free_port(),
    }
    argv = [*CLI, "demo", "--state-db", str(tmp_path / "demo.sqlite3")]
    for option, port in ports.items():
        argv += [option, str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield ports["--modbus-port"], ports["--metrics-port"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, proc.stderr.read()


@pytest.mark.slow
def test_page_shows_what_status_json_reads(demo, tmp_path):
    require_tool("chromium")
    modbus, http = demo
    url = f"http://127.0.0.1:{http}/"
    deadline = time.monotonic() + 30
    rows: list[dict] = []
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            rows = status_json(modbus)
        except AssertionError:  # not listening yet
            continue
        if len(rows) == 2 and all(r["charging"] for r in rows):
            break
    assert [r["lp"] for r in rows] == [1, 2] and all(r["charging"] for r in rows), rows

    # The station data change with every poll (5 s): the page shows a poll between a reading
    # of status --json before and one after it loaded, so it matches one of them (on a busy
    # machine the two readings may be a poll apart).
    def matches(cards: Cards, rows: list[dict]) -> bool:
        return sorted(cards.cards) == [r["lp"] for r in rows] and all(
            cards.cards[row["lp"]].get(field, "").startswith(text)
            for row in rows
            for field, text in expected_card(row).items()
        )

    for _ in range(6):
        before = status_json(modbus)
        dom = chromium(tmp_path, url, "--dump-dom")
        after = status_json(modbus)
        page = Cards()
        page.feed(dom)
        if matches(page, before) or matches(page, after):
            break
    else:
        pytest.fail(f"the page shows neither reading: {page.cards} {before} {after}")
    assert sorted(page.cards) == [1, 2]
    for row in before:
        card = page.cards[row["lp"]]
        assert card["firmware"] == "4"
        assert card["controller"].startswith("modbus, heartbeat ")
        assert card["pilot"] == "C · contactor closed"
        assert card["reasons"] == ""  # charging as asked: nothing to explain
        assert card["rssi_dbm"] == "-62 dBm"
        # The virtual station's own log lines (the last six: the demo's controller adds a
        # "pwm N%" line to LP1 every 5 s, which pushes "contactor on" out on a slow machine).
        assert re.search(r"contactor on|pwm \d+%", card["log"]), card["log"]
    assert "<svg" in dom and 'class="line"' in dom  # the power charts have data
