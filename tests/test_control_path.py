"""The one control path: every interface's commands are checked, logged, counted and committed
here, all or nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import idle_data
from ports import free_port
from pymodbus.client import AsyncModbusTcpClient

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.control import Command, Control, Kind
from openwb_modbus_evse.evse.protocol import Pilot
from openwb_modbus_evse.interfaces.modbus.registers import REGISTER_MAP
from openwb_modbus_evse.interfaces.modbus.server import ChargePointServer


class Counted:
    def __init__(self) -> None:
        self.refusals: list[tuple[str, str]] = []

    def command_refused(self, interface: str, reason: str) -> None:
        self.refusals.append((interface, reason))


def point(lp: int, controller: str = "modbus") -> cp.ChargePoint:
    serial = f"{lp:032X}"
    config = cp.ChargePointConfig(controller=controller)
    p = cp.ChargePoint(cp.Identity(serial, lp, f"LP{lp}", serial[-20:]), config)
    p.observe(idle_data(pilot=Pilot.B_9V), 0.0)
    return p


def test_orders_are_carried_out_all_or_none():
    one, two = point(1), point(2, controller="openwb-mqtt")
    counted = Counted()
    control = Control(lambda: 1.0, lambda: [one, two], counted)
    before = (one.state, two.state)
    with pytest.raises(cp.Refused) as err:
        control.execute(
            "modbus", [(one, Command(Kind.CURRENT, 1600)), (two, Command(Kind.CURRENT, 1600))]
        )
    assert err.value.kind is cp.RefusalKind.NOT_CONTROLLER
    assert (one.state, two.state) == before  # the first, valid order was not carried out
    assert counted.refusals == [("modbus", "not_controller")]  # counted once, here
    control.execute("modbus", [(one, Command(Kind.CURRENT, 1600)), (one, Command(Kind.PHASES, 3))])
    assert one.state.requested_ca == 1600 and one.state.phase_target == 3


def test_every_state_machine_refusal_is_counted_with_its_reason():
    p = point(1)
    counted = Counted()
    control = Control(lambda: 1.0, lambda: [p], counted)
    for command, reason in (
        (Command(Kind.CURRENT, 500), "bad_value"),
        (Command(Kind.PHASES, 2), "bad_value"),
        (Command(Kind.CP_INTERRUPTION, 0), "bad_value"),
    ):
        with pytest.raises(cp.Refused):
            control.execute("modbus", [(p, command)])
        assert counted.refusals[-1] == ("modbus", reason)
    control.execute("modbus", [(p, Command(Kind.CP_INTERRUPTION, 5))])
    with pytest.raises(cp.Refused):  # one sequence at a time
        control.execute("modbus", [(p, Command(Kind.CP_INTERRUPTION, 5))])
    assert counted.refusals[-1] == ("modbus", "busy")


def test_refusals_and_changes_are_logged_within_a_rate(caplog):
    caplog.set_level(logging.INFO, logger="openwb_modbus_evse.control")
    p = point(1)
    control = Control(lambda: 1.0, lambda: [p])  # the clock stands still: no refill
    for _ in range(100):
        with pytest.raises(cp.Refused):
            control.execute("modbus", [(p, Command(Kind.CURRENT, 1))])
    for amps in range(6, 32):
        control.execute("modbus", [(p, Command(Kind.CURRENT, amps * 100))])
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    infos = [r for r in caplog.records if r.levelname == "INFO"]
    assert len(warnings) == 20 and len(infos) == 20  # a burst of 20 per kind, then 1 a second


def test_a_heartbeat_lapse_applies_to_the_points_it_drives_only():
    now = [0.0]
    modbus, mqtt = point(1), point(2, controller="openwb-mqtt")
    control = Control(lambda: now[0], lambda: [modbus, mqtt])
    beat = control.add_heartbeat("modbus", 10, what="Modbus request")
    for p in (modbus, mqtt):
        control.sync(p)
    assert not modbus.state.heartbeat_lapsed
    assert mqtt.state.heartbeat_lapsed  # its controller has no heartbeat running: lapsed
    now[0] = 10.0
    assert beat.check()
    assert modbus.state.heartbeat_lapsed
    beat.refresh()
    assert not modbus.state.heartbeat_lapsed and mqtt.state.heartbeat_lapsed


async def test_a_refused_write_answers_exception_3_with_the_default_observer():
    """The server on its own (no service around it): refusals belong to the control path."""
    p = point(1)
    loop = asyncio.get_running_loop()
    control = Control(loop.time, lambda: [p])
    server = ChargePointServer(lambda lp: p if lp == 1 else None, loop.time, control)
    await server.start("127.0.0.1", free_port())
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port, timeout=3, retries=0)
    try:
        assert await client.connect()
        address = REGISTER_MAP.address(1, "set_current")
        rr = await client.write_register(address, 100, device_id=1)  # 1 A: below 6 A
        assert rr.isError() and rr.exception_code == 3
        assert p.state.requested_ca == 0
        rr = await client.write_register(address, 1600, device_id=1)
        assert not rr.isError() and p.state.requested_ca == 1600
    finally:
        client.close()
        await server.stop()
