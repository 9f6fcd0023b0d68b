"""The heartbeat clock, with a fake clock and with a real short timeout."""

import asyncio
import math

from openwb_modbus_evse.heartbeat import Heartbeat


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lapses_at_80_s_exactly_and_recovers_with_the_next_request():
    clock, changes = FakeClock(), []
    hb = Heartbeat(80, clock, changes.append)
    clock.now += 79.999
    assert not hb.check() and not hb.lapsed
    clock.now = 1080.0
    assert hb.check() and hb.lapsed and changes == [True]
    assert not hb.check() and hb.lapses == 1  # once per lapse
    clock.now += 5
    hb.refresh()
    assert not hb.lapsed and changes == [True, False] and hb.recoveries == 1
    assert hb.deadline == 1085.0 + 80


def test_requests_push_the_deadline():
    clock, changes = FakeClock(), []
    hb = Heartbeat(80, clock, changes.append)
    for _ in range(10):
        clock.now += 79
        hb.refresh()
        assert not hb.check()
    assert changes == [] and hb.age() == 0


async def test_watch_lapses_on_time():
    loop = asyncio.get_running_loop()
    changes: list[tuple[bool, float]] = []
    hb = Heartbeat(0.3, loop.time, lambda lapsed: changes.append((lapsed, loop.time())))
    task = asyncio.create_task(hb.watch())
    await asyncio.sleep(0.5)
    assert [c[0] for c in changes] == [True]
    assert 0 <= changes[0][1] - hb.deadline < 0.05
    hb.refresh()
    await asyncio.sleep(0.1)
    assert [c[0] for c in changes] == [True, False] and not hb.lapsed
    task.cancel()


async def test_a_heartbeat_that_starts_lapsed_waits_for_the_first_request():
    loop = asyncio.get_running_loop()
    changes: list[bool] = []
    hb = Heartbeat(0.2, loop.time, changes.append, what="openWB heartbeat", lapsed=True)
    task = asyncio.create_task(hb.watch())
    await asyncio.sleep(0.3)
    assert hb.lapsed and changes == [] and hb.lapses == 0  # no grace period, no lapse counted
    hb.refresh()
    assert not hb.lapsed and changes == [False]
    await asyncio.sleep(0.3)
    assert hb.lapsed and changes == [False, True]
    task.cancel()


async def test_an_event_driven_heartbeat_never_lapses_by_time_only_by_lapse():
    clock, changes = FakeClock(), []
    hb = Heartbeat(math.inf, clock, changes.append, what="status", lapsed=True)
    hb.refresh()
    clock.now += 1e9
    assert not hb.check() and not hb.lapsed
    await asyncio.wait_for(hb.watch(), 1.0)  # no deadline to watch: returns at once
    hb.lapse("the controller said it is offline")
    hb.lapse("again")  # once per lapse
    assert hb.lapsed and hb.lapses == 1 and changes == [False, True]
    hb.refresh()
    assert not hb.lapsed and hb.recoveries == 2 and changes == [False, True, False]
