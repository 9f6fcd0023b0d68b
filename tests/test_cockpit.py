"""The owner's page in a real headless chromium: every control, clicked, checked at the station.

Two virtual stations (real wire protocol, virtual vehicles) on an in-process service with an
admin token; the browser is driven over the DevTools protocol (tests/cdp.py). Each control's
effect is checked where it matters: at the virtual station (PWM, contactor, uploads), and each
refusal is shown on the card with its reason.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cdp import Browser
from conftest import eventually, free_port, require_tool
from test_actions import IMAGE, TOKEN

from openwb_modbus_evse.history import RECORD
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.registry import CLAIM_RECORD
from openwb_modbus_evse.store import Store
from openwb_modbus_evse.tools.simulator import VehicleConfig, virtual_serial

pytestmark = pytest.mark.slow


def card(key: str) -> str:
    return f"document.querySelector('.card[data-key=\"{key}\"]')"


def field(key: str, name: str) -> str:
    return f"{card(key)}?.querySelector('[data-field={name}]')?.textContent"


async def click(browser: Browser, key: str, action: str, **inputs: object) -> str:
    """Fill the card's inputs and click its button as a person would (one script, so that no
    refresh comes in between), and return the message it shows at the end."""
    fills = "".join(
        f"c.querySelector('[name={name}]').value = {json.dumps(str(value))}; "
        f"c.querySelector('[name={name}]').dispatchEvent(new Event('change')); "
        for name, value in inputs.items()
    )
    await browser.eval(
        f"(c => {{ c.querySelector('[data-field=message]').textContent = ''; {fills}"
        f"c.querySelector('[data-action=\"{action}\"]').click(); }})({card(key)})"
    )
    return await browser.wait_for(
        f"(t => t && !t.endsWith('…') && t)({field(key, 'message')})", timeout=30
    )


async def reasons(browser: Browser, key: str) -> list[str]:
    await browser.eval("refresh()")
    return await browser.eval(
        f"[...{card(key)}.querySelectorAll('[data-field=reasons] li')].map(li => li.textContent)"
    )


def seed_history(state_db: str) -> None:
    """Six hours of power in the state file, as a previous run would have left it: LP1 follows
    the sun, LP2 charged for an hour."""
    now = int(time.time() // 60)
    lp1 = [max(0, round(11_000 * math.sin(math.pi * i / 300))) or None for i in range(-30, 330)]
    lp2 = [2200 if 120 <= i < 180 else 0 for i in range(360)]
    with Store(state_db) as store:
        # Stations a controller has charged through (their LP is restored): the history of a
        # station the service does not know is dropped.
        store.assign_lp(virtual_serial(1), 1)
        store.assign_lp(virtual_serial(2), 2)
        store.save_records(
            {
                f"{RECORD}{virtual_serial(1)}": {"end": now, "w": lp1},
                f"{RECORD}{virtual_serial(2)}": {"end": now, "w": lp2},
                f"{CLAIM_RECORD}{virtual_serial(1)}": "driven",
                f"{CLAIM_RECORD}{virtual_serial(2)}": "driven",
            }
        )


@pytest.fixture
async def cockpit(make_rig, settings, request):
    """A service with two stations (LP1 charging from Modbus, LP2 plugged in) and a browser."""
    require_tool("chromium")
    if request.node.get_closest_marker("seeded"):
        seed_history(settings.state_db)
    rig = await make_rig(
        replace(
            settings,
            metrics_host="127.0.0.1",
            metrics_port=free_port(),
            admin_token=TOKEN,
            heartbeat_timeout=600.0,
        )
    )
    one = await rig.station(1, firmware_after_update=5)
    two = await rig.station(2, VehicleConfig(plug_in_after=0.0, reaction_s=0.05))
    await eventually(lambda: rig.point(two.serial) is not None)
    client = await rig.client()
    await client.write_register(REGISTER_MAP.address(1, "set_current"), 1600, device_id=1)
    await one.wait_for(lambda s: s.contactor)
    browser = Browser()
    await browser.start()
    try:
        yield rig, browser, one, two
    finally:
        if browser.console:
            print("browser console:", *browser.console, sep="\n")
        await browser.close()


async def test_every_control_from_the_page(cockpit, tmp_path):
    rig, browser, one, two = cockpit
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/"
    await browser.open(url)
    await browser.wait_for(f"!!({card('lp1')} && {card('lp2')})")
    # An unnamed station is "LP2", not "LP2 · LP2"; no controls without the token.
    assert await browser.eval(f"{card('lp2')}.querySelector('h2').textContent") == "LP2"
    assert (
        await browser.eval(f"getComputedStyle({card('lp1')}.querySelector('.controls')).display")
        == "none"
    )

    # The token: a wrong one is said so and not kept; the right one is kept for the tab only.
    await browser.eval("document.getElementById('token').value = 'not-the-token-at-all'")
    await browser.eval("document.querySelector('#token-form button').click()")
    message = await browser.wait_for("document.getElementById('admin-message').textContent")
    assert message == "controls off: wrong admin token"
    assert await browser.eval(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    await browser.eval(f"document.getElementById('token').value = '{TOKEN}'")
    await browser.eval("document.querySelector('#token-form button').click()")
    await browser.wait_for("document.body.classList.contains('admin')")
    assert await browser.eval(f"sessionStorage.getItem('{TOKEN_KEY}')") == TOKEN
    assert TOKEN not in await browser.eval("location.href")

    # LP1 is driven by Modbus: the owner's current is refused with the reason.
    message = await click(browser, "lp1", "current", amps=10)
    assert message == (
        "set 10 A: refused: this charge point is controlled by modbus, not manual: switch its "
        "controller to manual first"
    )
    assert one.contactor and one.pwm == 26  # 16 A, untouched

    # Take it: manual starts stopped, the card says so plainly.
    message = await click(browser, "lp1", "controller", controller="manual")
    assert message == "switch to manual: done"
    await one.wait_for(lambda s: not s.contactor and s.pwm == 100)
    assert await reasons(browser, "lp1") == ["the owner stopped charging (manual)"]
    assert await browser.eval(field("lp1", "controller")) == (
        "manual (the owner): stopped, kept until changed"
    )
    # Modbus writes are refused now.
    client = rig.clients[0]
    answer = await client.write_register(REGISTER_MAP.address(1, "set_current"), 1600, device_id=1)
    assert answer.isError()

    assert await click(browser, "lp1", "current", amps=10) == "set 10 A: done"
    await one.wait_for(lambda s: s.contactor and s.pwm == 16)  # 10 A
    await browser.eval("refresh()")
    await browser.wait_for(f"{field('lp1', 'controller')}.includes('10.0 A, kept until changed')")
    assert await click(browser, "lp1", "current", amps=40) == (
        'set 40 A: refused: send {"amps": A} with A 0 (stop) or 6..32'
    )

    # Pilot interruption: state F at the station, explained on the card, then charging again.
    assert await click(browser, "lp1", "cp-interruption", seconds=3) == (
        "pilot interruption 3 s: done"
    )
    await one.wait_for(lambda s: s.pwm == 0)
    why = await browser.wait_for(
        f"(async () => {{ await refresh(); return {field('lp1', 'reasons')} }})()"
    )
    assert why.startswith("pilot interruption of 3 s")
    message = await click(browser, "lp1", "cp-interruption", seconds=3)
    assert message == (
        "pilot interruption 3 s: pilot interruption refused: a cp_interruption is running"
    )
    await one.wait_for(lambda s: s.contactor and s.pwm == 16, timeout=10)

    assert await click(browser, "lp1", "stop") == "stop: done"
    await one.wait_for(lambda s: not s.contactor and s.pwm == 100)

    # The chart: a time axis, kW, and the value under the pointer (api/history, fetched once a
    # minute by the page: here at once).
    await browser.wait_for(
        "(async () => { await loadHistory(); await refresh(); "
        "return histories.get('lp1')?.w.some((w) => w !== null) })()",
        timeout=20,
    )
    ticks = await browser.eval(
        f"[...{card('lp1')}.querySelectorAll('svg .tick')].map(t => t.textContent)"
    )
    assert "0 kW" in ticks and any(":" in t for t in ticks), ticks
    tip = await browser.eval(
        f"""(() => {{
          // Sweep the pointer from the right edge leftwards until it is over a minute with
          // data (the newest minutes may not be drawn yet on a busy machine).
          const svg = {card("lp1")}.querySelector('svg.chart');
          const r = svg.getBoundingClientRect();
          const tip = {card("lp1")}.querySelector('.tip');
          for (let x = r.right - 1; x > r.left; x -= 2) {{
            svg.dispatchEvent(new MouseEvent('mousemove', {{clientX: x, clientY: r.top + 10,
              bubbles: true}}));
            if (!tip.hidden && tip.textContent.endsWith(' kW')) break;
          }}
          return {card("lp1")}.querySelector('.tip').textContent;
        }})()"""
    )
    assert re.fullmatch(r"\d\d:\d\d( [AP]M)?: \d+\.\d\d kW", tip), tip

    # Firmware, with progress: the station gets the image and comes back with firmware 5.
    image = tmp_path / "firmware.bin"
    image.write_bytes(IMAGE)
    await browser.set_files('.card[data-key="lp1"] input[name=firmware]', [str(image)])
    assert await click(browser, "lp1", "firmware") == "firmware: 4 → 5, done"
    assert one.uploads == [IMAGE] and one.firmware == 5

    # Move: a taken LP is refused with the reason; a free one moves the card.
    assert await click(browser, "lp2", "move", lp=1) == "move to LP1: refused: LP1 is taken by LP1"
    await browser.eval("document.getElementById('admin-message').textContent = ''")
    await browser.eval(f"{card('lp2')}.querySelector('[name=lp]').value = '5'")
    await browser.eval(f"{card('lp2')}.querySelector('[data-action=move]').click()")
    await browser.wait_for(f"!!({card('lp5')} && !{card('lp2')})")
    message = await browser.wait_for("document.getElementById('admin-message').textContent")
    assert message == "LP2: move to LP5: done"
    assert await browser.eval(f"{card('lp5')}.querySelector('h2').textContent") == "LP5"
    assert rig.point(two.serial).identity.lp == 5

    # Forget: refused while connected; once the station is gone, its card goes.
    message = await click(browser, "lp5", "forget")
    assert message.startswith("forget: forget refused: LP5 is connected")
    await two.stop()
    await eventually(lambda: not rig.point(two.serial).state.connected)
    await browser.eval(f"{card('lp5')}.querySelector('[data-action=forget]').click()")
    await browser.wait_for(f"!{card('lp5')}")
    message = await browser.wait_for("document.getElementById('admin-message').textContent")
    assert message == "LP5: forget: done"
    assert rig.point(two.serial) is None

    # And back to Modbus: its writes apply again.
    assert await click(browser, "lp1", "controller", controller="modbus") == (
        "switch to modbus: done"
    )
    answer = await client.write_register(REGISTER_MAP.address(1, "set_current"), 1600, device_id=1)
    assert not answer.isError()
    await one.wait_for(lambda s: s.contactor, timeout=10)


TOKEN_KEY = "openwb-modbus-evse-admin-token"


@pytest.mark.seeded
async def test_screenshots_of_the_page_with_its_explanations(cockpit, tmp_path):
    """Desktop and phone; ``make screenshot`` copies them to docs/."""
    rig, browser, _, _ = cockpit
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/"
    await browser.open(url)
    await browser.eval(f"sessionStorage.setItem('{TOKEN_KEY}', '{TOKEN}')")
    await browser.open(url)
    await browser.wait_for("document.body.classList.contains('admin')")
    await browser.wait_for(f"!!({card('lp1')} && {card('lp2')})")
    # LP2's vehicle is plugged in but Modbus wrote no current for it: the card says why.
    assert await reasons(browser, "lp2") == ["the controller modbus requests no current"]
    # The history of the previous run is drawn (restored from the state file).
    assert await browser.eval(f"+{card('lp1')}.querySelector('.chartbox').dataset.points") > 300
    shots = {}
    for name, (width, height, mobile) in {
        "page.png": (1280, 900, False),
        "page-phone.png": (390, 900, True),
    }.items():
        await browser.size(width, height, mobile)
        await browser.eval("refresh()")
        shots[name] = tmp_path / name
        await browser.screenshot(shots[name])
        assert shots[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # Nothing sticks out sideways.
        assert await browser.eval("document.documentElement.scrollWidth") <= width
    if target := os.environ.get("OPENWB_SCREENSHOT"):  # make screenshot
        shutil.copy(shots["page.png"], target)
        shutil.copy(shots["page-phone.png"], Path(target).with_name("page-phone.png"))


async def test_a_claim_on_a_station_s_id_is_confirmed_from_the_page(cockpit):
    """LP2's station goes away and a device elsewhere sends its ID: the card says so and offers
    the confirmation; confirmed, that device is LP2's station."""
    from openwb_modbus_evse.identity import PEER_RECORD
    from openwb_modbus_evse.tools.simulator import VirtualStation

    rig, browser, _, two = cockpit
    registry = rig.bridge.registry
    await eventually(lambda: PEER_RECORD + two.serial in registry.store.records(PEER_RECORD))
    await two.stop()
    await eventually(lambda: not rig.point(two.serial).state.connected)
    moved = VirtualStation(
        two.serial,
        bridge=("127.0.0.1", rig.bridge.link.port),
        vehicle=VehicleConfig(plug_in_after=0.0, reaction_s=0.05),
        source="127.0.0.2",
        reconnect_delay=0.2,
    )
    await moved.start()
    rig.stations.append(moved)
    await eventually(lambda: registry.claim(two.serial) is not None)
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/"
    await browser.open(url)
    await browser.eval(f"sessionStorage.setItem('{TOKEN_KEY}', '{TOKEN}')")
    await browser.open(url)
    await browser.wait_for("document.body.classList.contains('admin')")
    await browser.wait_for(
        f"!!{card('lp2')} && !{card('lp2')}.querySelector('[data-field=claim]').hidden"
    )
    (reason,) = await reasons(browser, "lp2")
    assert "a device at 127.0.0.2 connects with this station's ID" in reason
    assert await browser.eval(f"{card('lp1')}.querySelector('[data-field=claim]').hidden")

    message = await click(browser, "lp2", "confirm")
    assert message == "confirm: done"
    assert registry.claim(two.serial) is None
    assert registry.session(two.serial).host == "127.0.0.2"
    await browser.wait_for(f"{card('lp2')}.querySelector('[data-field=claim]').hidden")
