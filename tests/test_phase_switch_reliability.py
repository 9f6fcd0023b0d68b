"""Phase switching that does not stick (evcc#29384), end to end over TCP.

A relay command (a shell one-liner) records every switch in a file; the virtual vehicle draws on
the phases the last line names, as behind a real relay. What a controller learns of the phases
in use is the measured currents: evcc has no phases register and counts the phase currents it
reads at 10107..10109; an openWB primary reads ``phases_in_use``.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import pytest
from conftest import eventually, station_config
from openwb_primary import Primary
from test_control import FAST_VEHICLE, read, write

from openwb_modbus_evse import phaseswitch
from openwb_modbus_evse.chargepoint import STOPPED_MA


class Relay:
    """An external phase relay: its command appends the phases to a file and exits 0, or 3
    while ``failing``; the vehicle draws on the phases of the last line (``start`` before)."""

    def __init__(self, tmp_path: Path, start: int = 3) -> None:
        self.out = tmp_path / "relay.txt"
        self.fail_flag = tmp_path / "relay-fails"
        if start != 3:
            self.out.write_text(f"{start}\n")
        script = (
            f"if [ -e {shlex.quote(str(self.fail_flag))} ]; then exit 3; fi; "
            f'echo "$1" >> {shlex.quote(str(self.out))}'
        )
        self.command = shlex.join(["sh", "-c", script, "relay"])

    @property
    def switches(self) -> list[int]:
        return [int(x) for x in self.out.read_text().split()] if self.out.exists() else []

    def phases(self) -> int:
        switches = self.switches
        return switches[-1] if switches else 3

    def failing(self, fail: bool) -> None:
        if fail:
            self.fail_flag.touch()
        else:
            self.fail_flag.unlink(missing_ok=True)


def drawing_on(currents) -> int:
    return sum(c >= STOPPED_MA for c in currents)


async def modbus_phases(client) -> int:
    """The phases evcc counts: the phase currents it reads (A), above 1 A."""
    values = await read(client)
    return sum((values[f"current_l{i}"] or 0) >= STOPPED_MA / 1000 for i in (1, 2, 3))


async def switch_rig(make_rig, settings, relay: Relay, **changes):
    fast = {"poll_interval": 0.2, "phase_switch_pause": 0.05, "stop_timeout": 0.5}
    station_cfg = station_config(1, lp=1, phase_switch_command=relay.command)
    rig = await make_rig(settings, station=(station_cfg,), **{**fast, **changes})
    station = await rig.station(1, FAST_VEHICLE, relay=relay.phases)
    await station.wait_for(lambda s: s.plugged)
    return rig, station


async def modbus_switch(client, phases: int) -> None:
    assert await write(client, 1, "phase_target", phases) is None
    assert await write(client, 1, "phase_switch_trigger", 1) is None


async def test_twenty_alternating_switches_all_run_in_order_and_charging_resumes(
    make_rig, settings, tmp_path
):
    relay = Relay(tmp_path)
    rig, station = await switch_rig(make_rig, settings, relay)
    client = await rig.client()
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: drawing_on(s.currents_ma) == 3)
    targets = [1, 3] * 10
    for n, phases in enumerate(targets, 1):
        await modbus_switch(client, phases)
        await station.wait_for(lambda s: not s.contactor, timeout=6)  # stopped for the switch
        await station.wait_for(
            lambda s, p=phases: s.contactor and s.pwm == 26 and drawing_on(s.currents_ma) == p,
            timeout=6,
        )  # resumed at 16 A on the new phases
        assert relay.switches == targets[:n]  # this switch ran, once, after all before it
        await until_modbus_phases(client, phases)  # what evcc counts
        assert rig.point(station.serial).state.phases == phases
    assert relay.switches == targets


async def until_modbus_phases(client, phases: int, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await modbus_phases(client) != phases:
        assert loop.time() < deadline, f"Modbus never showed {phases} phase(s)"
        await asyncio.sleep(0.05)


async def test_a_vehicle_stuck_on_one_phase_gets_the_switch_to_three(make_rig, settings, tmp_path):
    # The relay was left at one phase (before a restart, or it did not follow a command): the
    # service assumes the wiring's three. Asked for three, it must switch, not answer "no-op"
    # while the vehicle goes on drawing on one phase (evcc#29384).
    relay = Relay(tmp_path, start=1)
    rig, station = await switch_rig(make_rig, settings, relay)
    client = await rig.client()
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 1)
    await until_modbus_phases(client, 1)  # what evcc sees
    await modbus_switch(client, 3)
    await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 3, timeout=4)
    assert relay.switches == [1, 3]
    await until_modbus_phases(client, 3)
    # Asked for three again: now a no-op, charging goes on.
    await modbus_switch(client, 3)
    await asyncio.sleep(0.5)
    assert relay.switches == [1, 3] and station.contactor


async def test_a_failed_switch_stays_stopped_and_the_next_trigger_retries(
    make_rig, settings, tmp_path
):
    relay = Relay(tmp_path)
    rig, station = await switch_rig(make_rig, settings, relay)
    client = await rig.client()
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: drawing_on(s.currents_ma) == 3)
    relay.failing(True)
    await modbus_switch(client, 1)
    point = rig.point(station.serial)
    await eventually(lambda: point.state.switch_failed, timeout=4)
    await asyncio.sleep(0.5)
    values = await read(client)
    assert values["charging"] == 0 and values["offered_current"] == 0
    assert not station.contactor and point.state.sequence is None
    # A retry with the same target, the command fails again: still stopped, still retryable.
    await modbus_switch(client, 1)
    await eventually(lambda: point.state.sequence is None and point.state.switch_failed)
    assert not station.contactor
    relay.failing(False)
    await modbus_switch(client, 1)
    await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 1, timeout=4)
    assert relay.switches == [1] and not point.state.switch_failed
    await until_modbus_phases(client, 1)


async def test_a_repeated_trigger_during_the_switch_is_the_same_switch(
    make_rig, settings, tmp_path
):
    relay = Relay(tmp_path)
    rig, station = await switch_rig(make_rig, settings, relay, phase_switch_pause=1.0)
    client = await rig.client()
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: drawing_on(s.currents_ma) == 3)
    await modbus_switch(client, 1)
    await modbus_switch(client, 1)  # a controller that repeats itself: accepted
    await eventually(lambda: relay.switches == [1], timeout=3)
    await modbus_switch(client, 1)  # during the pause
    assert await write(client, 1, "phase_target", 3) is None
    assert await write(client, 1, "phase_switch_trigger", 1) == 6  # another target: busy
    await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 1, timeout=4)
    assert relay.switches == [1]


@pytest.fixture
def mqtt_settings(settings, broker):
    return broker.settings(settings, mqtt_heartbeat_timeout=5.0, controller="openwb-mqtt")


async def test_openwb_primary_sees_the_phases_in_use_and_unsticks_them(
    broker, mqtt_settings, make_rig, tmp_path
):
    relay = Relay(tmp_path, start=1)
    rig, station = await switch_rig(make_rig, mqtt_settings, relay)
    primary = Primary(broker.port)
    await eventually(lambda: rig.bridge.mqtt.connected)
    async with primary.beating():
        await primary.cycle(16)
        await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 1)
        await until_phases_in_use(primary, 1)
        await primary.send("phases_to_use", 3)
        await primary.send("trigger_phase_switch", True)
        await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 3, timeout=4)
        await until_phases_in_use(primary, 3)
    assert relay.switches == [1, 3]


async def until_phases_in_use(primary: Primary, phases: int, timeout: float = 3.0) -> None:
    """Until the primary reads ``phases_in_use`` = ``phases``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await primary.read(0.3)).get("phases_in_use") != phases:
        assert loop.time() < deadline, f"phases_in_use never showed {phases}"


async def test_a_crash_running_the_command_counts_as_a_failed_switch(
    make_rig, settings, tmp_path, monkeypatch, caplog
):
    relay = Relay(tmp_path)
    rig, station = await switch_rig(make_rig, settings, relay)
    client = await rig.client()
    assert await write(client, 1, "set_current", 1600) is None
    await station.wait_for(lambda s: drawing_on(s.currents_ma) == 3)
    real = phaseswitch.run_switch_command

    async def crash(*_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(phaseswitch, "run_switch_command", crash)
    await modbus_switch(client, 1)
    point = rig.point(station.serial)
    # Not left "switching" for ever, where every trigger would be refused as busy.
    await eventually(lambda: point.state.switch_failed and point.state.sequence is None)
    assert "could not be run" in caplog.text
    monkeypatch.setattr(phaseswitch, "run_switch_command", real)
    await modbus_switch(client, 1)
    await station.wait_for(lambda s: s.contactor and drawing_on(s.currents_ma) == 1, timeout=4)
    assert relay.switches == [1]
