"""Grid operator dimming (§14a EnWG): MQTT, the HTTP API and dim_command lower the shared
supply at runtime; the limit survives a restart and shows in /api/status and the metrics."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import aiomqtt
import pytest
from conftest import eventually, free_port, metric

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.config import ConfigError, build
from openwb_modbus_evse.dimming import BadLimit, parse_limit
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.supply import device_floor_ca, limit_in_use
from openwb_modbus_evse.tools.simulator import VehicleConfig

ADDR = REGISTER_MAP.address
TOKEN = "dimming-token-for-tests"
VEHICLE = VehicleConfig(plug_in_after=0.0, reaction_s=0.05, max_current_a=32)
TOPIC = "openwb-modbus-evse/set/supply_limit"
# PWM for an offered current: floor(amps / 0.6)
PWM_16A, PWM_10A, PWM_12A, PWM_8A, PWM_FLOOR = 26, 16, 20, 13, 11


@pytest.fixture
def web_settings(settings):
    return replace(settings, metrics_host="127.0.0.1", metrics_port=free_port(), admin_token=TOKEN)


async def charge(rig, index: int, amps: int = 16):
    """A station with a vehicle, asked for ``amps`` over Modbus, charging."""
    station = await rig.station(index, VEHICLE)
    client = await rig.client()
    lp = rig.point(station.serial).identity.lp
    rr = await client.write_register(ADDR(lp, "set_current"), amps * 100, device_id=1)
    assert not rr.isError()
    await station.wait_for(lambda s: s.contactor and s.pwm == amps * 100 // 60, timeout=5)
    return station


async def post_limit(rig, body, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/api/supply/limit"
    data = body if isinstance(body, str) else json.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, headers=headers, data=data) as response,
    ):
        return response.status, json.loads(await response.text())


async def status(rig) -> dict:
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/api/status"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return json.loads(await response.text())


# --- the limit's syntax and the floor (pure) -----------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "centiamps"),
    [
        ("16", 1600),
        (" 10.5 A", 1050),
        ("6900W", 1000),
        ("6.9 kW", 1000),
        ('{"amps": 12}', 1200),
        ('{"watts": 11000}', 1594),  # 11000 / 690 = 15.94 A, rounded down
        ("", None),
        ("null", None),
        ('{"amps": null}', None),
        ("0", 0),
    ],
)
def test_a_limit_in_amperes_or_watts(payload, centiamps):
    assert parse_limit(payload.encode()) == centiamps


@pytest.mark.parametrize(
    "payload",
    [b"lots", b"-3", b"1e9", b"nan", b"inf A", b'{"amps": "10"}', b'{"volts": 3}', b"\xff", b"{"],
)
def test_what_is_no_limit_is_refused_with_what_is_accepted(payload):
    with pytest.raises(BadLimit, match=r"send|must be"):
        parse_limit(payload)


def test_the_14a_floor_is_4_2_kw_per_station_in_pwm_steps():
    assert device_floor_ca(3) == 660  # 6.09 A -> 6.6 A: PWM 11 %, 3 x 230 V x 6.6 A = 4.55 kW
    assert device_floor_ca(1) == 1860  # 18.26 A -> 18.6 A
    assert limit_in_use(None, None, 1320) is None  # no limit at all
    assert limit_in_use(None, 500, 1320) == 1320  # dimmed below the floor: the floor
    assert limit_in_use(1000, 500, 1320) == 1000  # the fuse is physics: never raised
    assert limit_in_use(3200, 2000, 660) == 2000


def test_an_unsplittable_dim_command_is_a_config_error():
    with pytest.raises(ConfigError, match="dim_command"):
        build({"dim_command": "read 'contact"})


# --- end to end ----------------------------------------------------------------------------------


async def test_mqtt_dims_the_supply_at_once_and_refuses_what_it_cannot_read(
    make_rig, settings, broker
):
    rig = await make_rig(broker.settings(settings))
    station = await charge(rig, 1)
    assert rig.point(station.serial).state.supply_cap_ca is None  # dimmable, but not dimmed
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(TOPIC, b"10")
        await station.wait_for(lambda s: s.pwm == PWM_10A, timeout=5)
        service = rig.bridge
        assert metric(service, "openwb_modbus_evse_supply_limit_amperes", source="mqtt") == 10
        assert metric(service, "openwb_modbus_evse_supply_limit_amperes", source="in_use") == 10
        await client.publish(TOPIC, b'{"watts": 8280}')  # 12 A per phase
        await station.wait_for(lambda s: s.pwm == PWM_12A, timeout=5)

        await client.publish(TOPIC, b"a lot")
        refused = {"interface": "dimming-mqtt", "reason": "bad_value"}
        await eventually(
            lambda: metric(service, "openwb_modbus_evse_commands_refused_total", **refused) == 1
        )
        await asyncio.sleep(0.3)
        assert station.pwm == PWM_12A  # nothing changed

        await client.publish(TOPIC, b"")  # cleared
        await station.wait_for(lambda s: s.pwm == PWM_16A, timeout=5)
    assert metric(service, "openwb_modbus_evse_supply_limit_amperes", source="in_use") is None
    assert rig.point(station.serial).state.supply_cap_ca is None


async def test_http_sets_the_limit_which_survives_a_restart(make_rig, web_settings):
    rig = await make_rig(web_settings)
    station = await charge(rig, 1)
    assert (await post_limit(rig, {"amps": 10}, token=None))[0] == 401
    assert (await post_limit(rig, {"amps": 10}, token="wrong-token-wrong-token"))[0] == 403
    code, body = await post_limit(rig, {"amperes": 10})
    assert code == 400 and "amps" in body["error"]
    assert (await post_limit(rig, "ten"))[0] == 400
    assert station.pwm == PWM_16A  # refused: nothing changed

    code, body = await post_limit(rig, {"amps": 10})
    assert code == 200 and body["dimming_limit_a"] == 10
    await station.wait_for(lambda s: s.pwm == PWM_10A, timeout=5)
    supply = (await status(rig))["supply"]
    assert supply["limit_a"] == 10 and supply["dimmed"] and supply["sources"] == {"http": 10}
    await rig.close()

    # After a restart the kept limit holds before the station is even asked for current.
    rig = await make_rig(web_settings)
    assert (await status(rig))["supply"]["sources"] == {"http": 10}
    station = await rig.station(1, VEHICLE)
    watch = asyncio.create_task(_peak(station))
    client = await rig.client()
    rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    await station.wait_for(lambda s: s.contactor and s.pwm == PWM_10A, timeout=5)
    watch.cancel()
    assert await watch <= 10.0  # never more than the kept limit, from the first moment

    code, body = await post_limit(rig, {"amps": None})
    assert code == 200 and body["dimming_limit_a"] is None
    await station.wait_for(lambda s: s.pwm == PWM_16A, timeout=5)
    assert (await status(rig))["supply"]["dimmed"] is False


async def _peak(station) -> float:
    """The most the station offers until cancelled."""
    peak = 0.0
    try:
        while True:
            peak = max(peak, cp.offered_amps(station.pwm))
            await asyncio.sleep(0.002)
    except asyncio.CancelledError:
        return peak


async def test_dim_command_reads_the_contact_and_the_lowest_source_wins(
    make_rig, web_settings, tmp_path: Path
):
    contact = tmp_path / "contact"
    test = shutil.which("test")
    assert test is not None
    # coreutils' test(1): exit 0 (dimmed) while the file exists, 1 (not dimmed) otherwise
    rig = await make_rig(
        web_settings, dim_command=f"{test} -e {contact}", dim_poll_interval=0.2, dim_limit=8.0
    )
    station = await charge(rig, 1)
    contact.touch()  # the control box closes the contact
    await station.wait_for(lambda s: s.pwm == PWM_8A, timeout=5)
    service = rig.bridge
    assert metric(service, "openwb_modbus_evse_supply_limit_amperes", source="command") == 8

    # HTTP asks for less than the §14a floor: the lowest source wins, but not below the floor
    assert (await post_limit(rig, {"amps": 2}))[0] == 200
    await station.wait_for(lambda s: s.pwm == PWM_FLOOR, timeout=5)
    assert metric(service, "openwb_modbus_evse_supply_dimming_floor_amperes") == 6.6
    assert (await post_limit(rig, {"amps": None}))[0] == 200
    await station.wait_for(lambda s: s.pwm == PWM_8A, timeout=5)

    contact.unlink()  # open again
    await station.wait_for(lambda s: s.pwm == PWM_16A, timeout=5)


async def test_a_dim_command_that_fails_counts_as_dimmed(make_rig, settings, tmp_path: Path):
    rig = await make_rig(settings, dim_command=str(tmp_path / "missing"), dim_limit=10.0)
    station = await rig.station(1, VEHICLE)
    client = await rig.client()
    rr = await client.write_register(ADDR(1, "set_current"), 1600, device_id=1)
    assert not rr.isError()
    await station.wait_for(lambda s: s.contactor and s.pwm == PWM_10A, timeout=5)
    await asyncio.sleep(0.3)
    assert station.pwm == PWM_10A


async def test_two_stations_keep_their_floor_each_and_a_raise_stays_within_the_limit(
    make_rig, web_settings
):
    rig = await make_rig(web_settings)
    one = await charge(rig, 1)
    two = await charge(rig, 2)
    assert (await post_limit(rig, {"watts": 0}))[0] == 200  # dimmed as far as §14a allows
    await one.wait_for(lambda s: s.pwm == PWM_FLOOR, timeout=5)
    await two.wait_for(lambda s: s.pwm == PWM_FLOOR, timeout=5)
    assert (await status(rig))["supply"]["floor_a"] == 13.2
    await eventually(
        lambda: all(rig.point(s.serial).state.data.pwm == PWM_FLOOR for s in (one, two))
    )

    # 24 A: 12 A each; one is raised only once the other's report leaves room
    watch = asyncio.create_task(_peak_sum([one, two]))
    assert (await post_limit(rig, {"amps": 24}))[0] == 200
    await one.wait_for(lambda s: s.pwm == PWM_12A, timeout=5)
    await two.wait_for(lambda s: s.pwm == PWM_12A, timeout=5)
    watch.cancel()
    assert await watch <= 24.0
    # 14 A: both lowered at once, 7 A each (offered 6.6 A)
    assert (await post_limit(rig, {"amps": 14}))[0] == 200
    await one.wait_for(lambda s: s.pwm == PWM_FLOOR, timeout=5)
    await two.wait_for(lambda s: s.pwm == PWM_FLOOR, timeout=5)


async def _peak_sum(stations) -> float:
    """The most the stations offer together until cancelled."""
    peak = 0.0
    try:
        while True:
            peak = max(peak, sum(cp.offered_amps(s.pwm) for s in stations))
            await asyncio.sleep(0.002)
    except asyncio.CancelledError:
        return peak


async def test_without_supply_and_dimming_nothing_is_shared(make_rig, settings):
    rig = await make_rig(settings)
    assert rig.bridge.supply is None and rig.bridge.dimming is None
    station = await charge(rig, 1)
    assert rig.point(station.serial).state.supply_cap_ca is None
    assert metric(rig.bridge, "openwb_modbus_evse_supply_limit_amperes", source="in_use") is None


def test_a_dim_command_that_cannot_run_is_warned_about(tmp_path: Path):
    from openwb_modbus_evse.config import warnings

    missing = tmp_path / "no-such-reader"
    assert warnings(build({"dim_command": f"{missing} --contact 1"})) == [
        f"dim_command: {missing} does not exist"
    ]
    assert warnings(build({"dim_command": f"{sys.executable} -c pass"})) == []


@pytest.mark.parametrize(
    ("code", "prints", "dimmed"),
    [
        (0, "", True),
        (1, "", False),
        (0, "1\n", True),  # gpioget: the line is high
        (0, "0\n", False),
        (0, "off", False),
        (0, "maybe", True),  # not understood: the safe side
        (2, "0", True),
        (1, "1", False),
    ],
)
async def test_what_dim_command_says(code, prints, dimmed, settings):
    from openwb_modbus_evse.dimming import Dimming
    from openwb_modbus_evse.supply import SupplyLimit

    script = f"import sys; sys.stdout.write({prints!r}); sys.exit({code})"
    command = f"{sys.executable} -c {shlex.quote(script)}"
    dimming = Dimming(
        replace(settings, dim_command=command, dim_poll_interval=30), SupplyLimit(0), lambda: None
    )
    assert await dimming.read_contact() is dimmed


async def test_a_dim_command_that_prints_on_and_on_times_out_as_dimmed(settings):
    from openwb_modbus_evse.dimming import Dimming
    from openwb_modbus_evse.supply import SupplyLimit

    script = "import sys\nwhile True: sys.stdout.write('0' * 4096)"
    command = f"{sys.executable} -c {shlex.quote(script)}"
    dimming = Dimming(
        replace(settings, dim_command=command, dim_poll_interval=1.0), SupplyLimit(0), lambda: None
    )
    assert await dimming.read_contact() is True
