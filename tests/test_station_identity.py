"""A station's identity beyond its ID (issue 19, item 2): a known station's ID from elsewhere is
only a claim, held safe until the owner confirms it; the station from where it is known takes its
place back at once; the serial number controllers read tells nothing of the ID."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FAST, eventually, free_port
from test_actions import TOKEN, cli, http
from test_control import FAST_VEHICLE, read, start_charging, write
from test_rust_bridge import commands

from openwb_modbus_evse.evse.neighbours import mac_of
from openwb_modbus_evse.identity import PEER_RECORD, Peer, learned, recognised
from openwb_modbus_evse.interfaces.metrics import PREFIX
from openwb_modbus_evse.tools.simulator import VirtualStation

CLAIM_METRIC = PREFIX + "_unconfirmed_peer{"

# --- the rules ------------------------------------------------------------------------------

HOME = Peer("192.168.1.20", "aa:bb:cc:00:00:01")


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (Peer("192.168.1.20", "aa:bb:cc:00:00:01"), True),
        (Peer("192.168.1.77", "aa:bb:cc:00:00:01"), True),  # same MAC, new lease
        (Peer("192.168.1.20", "aa:bb:cc:00:00:99"), False),  # its address, another device
        (Peer("192.168.1.77", "aa:bb:cc:00:00:99"), False),
        (Peer("192.168.1.20"), True),  # no MAC here (routed): the address decides
        (Peer("10.0.0.5"), False),
    ],
)
def test_a_peer_is_the_station_by_its_mac_or_else_its_address(peer, expected):
    assert recognised(HOME, peer) is expected


def test_the_first_sight_is_trusted_and_a_mac_once_learned_is_kept():
    assert recognised(None, Peer("10.0.0.5"))
    assert learned(HOME, Peer("192.168.1.20")) == HOME  # no table entry now: MAC kept
    assert learned(HOME, Peer("192.168.1.77", HOME.mac)) == Peer("192.168.1.77", HOME.mac)
    assert learned(Peer("192.168.1.20"), Peer("192.168.1.20", "aa:aa:aa:aa:aa:aa")).mac


def test_the_mac_comes_from_complete_entries_of_the_neighbour_table(tmp_path: Path):
    table = tmp_path / "arp"
    table.write_text(
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "192.168.1.20     0x1         0x2         AA:BB:CC:00:00:01     *        eth0\n"
        "192.168.1.21     0x1         0x0         00:00:00:00:00:00     *        eth0\n"
        "192.168.1.22     0x1         zz          aa:bb:cc:00:00:03     *        eth0\n"
    )
    assert mac_of("192.168.1.20", table) == "aa:bb:cc:00:00:01"
    assert mac_of("192.168.1.21", table) is None  # incomplete: not resolved
    assert mac_of("192.168.1.22", table) is None
    assert mac_of("192.168.1.23", table) is None
    assert mac_of("192.168.1.20", tmp_path / "missing") is None


# --- on the wire ----------------------------------------------------------------------------


def other_host(rig, serial: str, source: str, vehicle=FAST_VEHICLE) -> VirtualStation:
    """A station with ``serial`` connecting from ``source`` (another loopback address)."""
    return VirtualStation(
        serial,
        bridge=("127.0.0.1", rig.bridge.link.port),
        vehicle=vehicle,
        source=source,
        **FAST,
    )


async def keep_writing(client, stop: asyncio.Event) -> None:
    """The controller goes on asking for 16 A on LP1 (its heartbeat too)."""
    while not stop.is_set():
        await write(client, 1, "set_current", 1600)
        await asyncio.sleep(0.2)


async def test_an_impostor_with_a_known_id_gets_no_current_nor_energy_and_gives_way(
    make_rig, settings
):
    rig = await make_rig(settings)
    registry = rig.bridge.registry
    client = await rig.client()
    real = await start_charging(rig, client)  # driven from 127.0.0.1: kept, and seen there
    serial = real.serial
    point = rig.point(serial)
    await eventually(lambda: registry.store.records(PEER_RECORD))
    assert registry.store.records(PEER_RECORD)[PEER_RECORD + serial]["address"] == "127.0.0.1"
    await real.stop()
    await eventually(lambda: not point.state.connected)
    energy = point.energy_wh

    stop = asyncio.Event()
    writer = asyncio.create_task(keep_writing(client, stop))
    impostor = other_host(rig, serial, "127.0.0.2")
    await impostor.start()
    try:
        await eventually(lambda: registry.claim(serial) == Peer("127.0.0.2"))
        await asyncio.sleep(1.5)  # three polls, the controller asking for 16 A all along
        offered = [v for kind, v in commands(impostor) if kind == "pwm" and v != 100]
        assert offered == [] and not impostor.contactor and impostor.pwm == 100
        assert point.energy_wh == energy and not point.state.connected
        assert registry.session(serial) is None  # no controller's command reaches it
        shown = await read(client)
        assert shown["charging"] == 0 and shown["power"] == 0

        # The real station comes back from where it is known: it is served at once, the
        # claimant is closed, and charging goes on.
        back = other_host(rig, serial, "127.0.0.1")
        await back.start()
        await back.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
        assert registry.claim(serial) is None
        assert registry.session(serial) is not None and registry.session(serial).host == (
            "127.0.0.1"
        )
        await back.stop()
    finally:
        stop.set()
        await writer
        await impostor.stop()


async def test_the_owner_confirms_a_station_that_moved_and_the_old_address_is_a_claim_then(
    make_rig, settings, caplog
):
    web = replace(settings, metrics_host="127.0.0.1", metrics_port=free_port(), admin_token=TOKEN)
    rig = await make_rig(web)
    registry = rig.bridge.registry
    client = await rig.client()
    real = await start_charging(rig, client)
    serial = real.serial
    await eventually(lambda: registry.store.records(PEER_RECORD))
    await real.stop()
    await eventually(lambda: not rig.point(serial).state.connected)

    moved = other_host(rig, serial, "127.0.0.3")
    await moved.start()
    await eventually(lambda: registry.claim(serial) is not None)
    assert "last seen at 127.0.0.1" in caplog.text and "confirm" in caplog.text
    status, body = await http(rig, "GET", "/api/status", token=None)
    (card,) = [c for c in body["charge_points"] if c["lp"] == 1]
    assert card["claim"] == "127.0.0.3"
    assert card["reasons"][0]["code"] == "unconfirmed_peer"
    listed = await cli(rig, "stations")
    assert "CLAIMED from 127.0.0.3" in listed.stdout, listed.stdout + listed.stderr
    status, metrics = await http(rig, "GET", "/metrics", token=None)
    (sample,) = [m for m in metrics["text"].splitlines() if m.startswith(CLAIM_METRIC)]
    assert 'lp="1"' in sample and sample.endswith(" 1.0")

    # Confirming without the token changes nothing; with it, the station is served at once.
    status, _ = await http(rig, "POST", f"/api/stations/{serial}/confirm", token="wrong")
    assert status == 403 and registry.claim(serial) is not None
    done = await cli(rig, "confirm", serial)
    assert done.returncode == 0, done.stderr
    assert "127.0.0.3" in done.stdout
    assert registry.claim(serial) is None
    stop = asyncio.Event()
    writer = asyncio.create_task(keep_writing(client, stop))
    try:
        await moved.wait_for(lambda s: s.contactor and any(s.currents_ma), timeout=5)
        record = registry.store.records(PEER_RECORD)[PEER_RECORD + serial]
        assert record["address"] == "127.0.0.3"
        # Nothing left to confirm: a clear answer, nothing changed.
        status, body = await http(rig, "POST", f"/api/stations/{serial}/confirm")
        assert status == 404 and "no unconfirmed peer" in body["error"]

        # Now the old address is the stranger: while the station answers there, it is refused.
        old = other_host(rig, serial, "127.0.0.1")
        await old.start()
        await asyncio.sleep(1.0)
        assert registry.session(serial).host == "127.0.0.3" and moved.contactor
        assert registry.claim(serial) is None
        await old.stop()
    finally:
        stop.set()
        await writer
        await moved.stop()


async def test_a_station_pinned_to_an_address_in_the_config_needs_no_confirmation(
    make_rig, settings
):
    from conftest import station_config

    rig = await make_rig(
        settings, station=(station_config(1, lp=1, address=ipaddress.ip_network("127.0.0.0/29")),)
    )
    client = await rig.client()
    real = await start_charging(rig, client)
    serial = real.serial
    await real.stop()
    await eventually(lambda: not rig.point(serial).state.connected)
    elsewhere = other_host(rig, serial, "127.0.0.4")  # inside the pin: the pin decides
    await elsewhere.start()
    stop = asyncio.Event()
    writer = asyncio.create_task(keep_writing(client, stop))
    try:
        await elsewhere.wait_for(lambda s: s.contactor, timeout=5)
        assert rig.bridge.registry.claim(serial) is None
    finally:
        stop.set()
        await writer
        await elsewhere.stop()


async def test_the_serial_number_controllers_read_is_stable_and_not_the_id(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    station = await rig.station(1)
    shown = await read(client)
    number = shown["serial_number"]
    assert number.startswith("EVSE-") and len(number) == 17
    assert number[5:].lower() not in station.serial.lower()
    assert station.serial[-8:].lower() not in number.lower()
    await rig.close()
    again = await make_rig(settings)  # the same state file: the same number
    other = await again.station(1)
    client = await again.client()
    assert (await read(client))["serial_number"] == number
    assert other.serial == station.serial


async def test_by_mac_a_new_address_is_the_station_and_another_device_at_its_address_is_not(
    make_rig, settings
):
    rig = await make_rig(settings)
    registry = rig.bridge.registry
    table = {"127.0.0.1": "aa:bb:cc:00:00:01", "127.0.0.5": "aa:bb:cc:00:00:01"}
    rig.bridge.link.neighbours = table.get  # what the neighbour table says on a real LAN
    client = await rig.client()
    real = await start_charging(rig, client)
    serial = real.serial
    await eventually(lambda: PEER_RECORD + serial in registry.store.records(PEER_RECORD))
    assert registry.store.records(PEER_RECORD)[PEER_RECORD + serial]["mac"] == table["127.0.0.1"]
    await real.stop()
    await eventually(lambda: not rig.point(serial).state.connected)

    stop = asyncio.Event()
    writer = asyncio.create_task(keep_writing(client, stop))
    try:
        renewed = other_host(rig, serial, "127.0.0.5")  # a new DHCP lease, the same MAC
        await renewed.start()
        await renewed.wait_for(lambda s: s.contactor, timeout=5)
        assert registry.claim(serial) is None
        record = registry.store.records(PEER_RECORD)[PEER_RECORD + serial]
        assert record["address"] == "127.0.0.5" and record["mac"] == table["127.0.0.5"]
        await renewed.stop()
        await eventually(lambda: not rig.point(serial).state.connected)

        table["127.0.0.1"] = "de:ad:be:ef:00:01"  # its old address, another device
        impostor = other_host(rig, serial, "127.0.0.1")
        await impostor.start()
        await eventually(lambda: registry.claim(serial) is not None)
        await asyncio.sleep(1.0)
        assert not impostor.contactor and impostor.pwm == 100
        await impostor.stop()
    finally:
        stop.set()
        await writer


async def test_where_a_station_was_seen_is_kept_across_a_restart(make_rig, settings):
    rig = await make_rig(settings)
    client = await rig.client()
    real = await start_charging(rig, client)
    await eventually(lambda: PEER_RECORD + real.serial in rig.bridge.registry.store.records(""))
    await rig.close()
    again = await make_rig(settings)
    impostor = other_host(again, real.serial, "127.0.0.2")
    await impostor.start()
    try:
        await eventually(lambda: again.bridge.registry.claim(real.serial) == Peer("127.0.0.2"))
        assert (
            again.point(real.serial).identity.lp == 1
            and again.bridge.registry.session(real.serial) is None
        )
    finally:
        await impostor.stop()
