"""Guards for the shared supply (supply.py) and the exposure rule of chargepoint.py.

Each test names the mutation it kills. The documented numbers (a station's own 300 s safety stop
plus 60 s for commands sent after its last report, 60 s idle, 15 min turns) are written here as
numbers, not taken from the modules' constants, so that changing a constant is caught.

The charge points are driven the way the service drives them (bridge.py): every change of a
charge point re-balances the supply first (``on_change``), the supply also re-balances once a
second, and a cap is set on a charge point only when it changes (``SupplyLimit.balance``).
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_supply import report

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.evse.protocol import StationData
from openwb_modbus_evse.supply import Claim, SupplyLimit, Turn, shares

CONFIG = cp.ChargePointConfig(supply_limited=True, stop_timeout=6.0)
SAFETY_STOP_S = 300.0  # the station switches off by itself this long after the last request
MARGIN_S = 60.0  # commands may still reach it this long after its last report
IDLE_S = 60.0  # offered current but not drawing for this long: its share shrinks to 6 A
TURN_S = 900.0  # 15 min: a served station yields to one that waits


class Vehicle:
    """A station and its vehicle as the tests see them: what it really offers and reports."""

    def __init__(self, pwm: int = cp.PWM_OFF, plugged: bool = False) -> None:
        self.pwm, self.contactor, self.plugged = pwm, False, plugged

    def offered_ca(self) -> int:
        return round(cp.offered_amps(self.pwm) * 100)

    def data(self) -> StationData:
        return report(self.pwm, self.contactor, self.plugged)


class Service:
    """Charge points and one supply, wired as bridge.py wires them (with a fake clock)."""

    def __init__(self, limit_a: float, serials: str = "ab") -> None:
        self.now = 0.0
        self.supply = SupplyLimit(limit_a)
        self.points: dict[str, cp.ChargePoint] = {}
        for i, serial in enumerate(serials):
            point = cp.ChargePoint(cp.Identity(serial, i + 1, serial, serial), CONFIG)
            point.on_change = self.balance  # bridge.py: changed() balances the supply first
            self.points[serial] = point

    def balance(self) -> None:
        self.supply.balance(self.points.values(), self.now)

    def leave(self, serial: str) -> None:
        """The charge point is released or forgotten (gone from the service's charge points)."""
        del self.points[serial]
        self.balance()

    def write(self, serial: str, centiamps: int) -> None:
        point = self.points[serial]
        point.commit(cp.set_current(point.state, centiamps, self.now))

    def report(self, serial: str, vehicle: Vehicle) -> None:
        self.points[serial].observe(vehicle.data(), self.now)

    def command(self, serial: str, vehicle: Vehicle) -> None:
        """The link sends what the charge point wants; the station applies it."""
        want = self.points[serial].target(self.now)
        assert want is not None
        vehicle.pwm, vehicle.contactor = want.pwm, want.contactor

    def granted(self, serial: str) -> int | None:
        return self.points[serial].state.supply_cap_ca


def charging_then_gone(service: Service, serial: str = "a") -> Vehicle:
    """``serial`` charges at 16 A (PWM 26, reported at t = 0), then its connection drops (t = 1)."""
    vehicle = Vehicle(plugged=True)
    service.write(serial, 1600)
    service.report(serial, vehicle)
    assert service.granted(serial) == 1600
    for _ in range(2):  # PWM 26, the vehicle asks, the contactor closes: all reported at t = 0
        service.command(serial, vehicle)
        service.report(serial, vehicle)
    assert (vehicle.pwm, vehicle.contactor) == (26, True)
    service.now = 1.0
    service.points[serial].disconnected(1.0, "connection lost")
    return vehicle


# --- 3. a disconnected station still counts until its own safety stop -------------------------


def test_a_disconnected_station_counts_for_300_s_plus_60_s_after_its_last_report():
    """kills: the margin dropped (``STATION_SAFETY_TIMEOUT`` alone), or a longer one; ``>=``
    for ``>``; and the time counted for connected stations too (``not state.connected``
    dropped: a station that is connected counts, however old its last report)."""
    service = Service(16)
    charging_then_gone(service)
    gone = service.points["a"].state
    last_report = 0.0
    assert cp.exposure_ca(gone, last_report + 1.0) == 1600  # its grant, not yet over
    assert cp.exposure_ca(gone, last_report + SAFETY_STOP_S) == 1600
    assert cp.exposure_ca(gone, last_report + SAFETY_STOP_S + MARGIN_S - 0.5) == 1600
    assert cp.exposure_ca(gone, last_report + SAFETY_STOP_S + MARGIN_S) == 1600  # not yet past
    assert cp.exposure_ca(gone, last_report + SAFETY_STOP_S + MARGIN_S + 0.5) == 0
    # connected: what it reported counts, however long ago that was
    still_there = replace(gone, connected=True)
    assert cp.exposure_ca(still_there, last_report + 10_000) == 1600


def test_another_station_waits_until_the_disconnected_one_has_switched_off():
    """The same rule seen through the supply: b gets nothing until 360 s after a's last report.

    kills: the margin dropped; a disconnected station counted as 0 at once."""
    service = Service(16)
    charging_then_gone(service)
    b = Vehicle(plugged=True)
    service.write("b", 1600)
    service.report("b", b)
    for now in (2.0, 60.0, SAFETY_STOP_S + 1, SAFETY_STOP_S + MARGIN_S - 1):
        service.now = now
        service.balance()
        assert service.granted("b") == 0, now
    service.now = SAFETY_STOP_S + MARGIN_S + 1
    service.balance()
    assert service.granted("b") == 600  # served at last (6 A: its vehicle drew nothing for 60 s)


# --- 4. supply: reconnect, idle rule, turns, re-balance, departed points -----------------------


def test_a_station_that_rebooted_starts_with_nothing_exposed_and_the_other_gets_the_supply():
    """a charged at 16 A, dropped, and comes back after a reboot (PWM 100, contactor open, no
    vehicle): its first report shows it offers nothing, so b is granted the whole supply at once.

    kills: a report that keeps the old grant as exposure (``supply_exposure_ca`` not reset to
    the current grant by ``observe``): b would wait for ever."""
    service = Service(16)
    charging_then_gone(service)
    b = Vehicle(plugged=True)
    service.write("b", 1600)
    service.report("b", b)
    assert service.granted("b") == 0  # a may still offer its 16 A
    service.now = 5.0
    service.report("a", Vehicle())  # reconnected: the first thing after the handshake
    assert cp.exposure_ca(service.points["a"].state, 5.0) == 0
    assert service.granted("b") == 1600


def test_a_station_that_comes_back_still_offering_keeps_counting():
    """The same, but a kept its PWM 26 while away: what it reports counts, b gets nothing.

    kills: a reconnecting station counted as offering nothing (exposure from the grant only)."""
    service = Service(16)
    a = charging_then_gone(service)
    b = Vehicle(plugged=True)
    service.write("b", 1600)
    service.report("b", b)
    service.now = 5.0
    a.plugged = False  # the vehicle left meanwhile: a asks for nothing, but still offers 26 %
    a.contactor = False
    service.report("a", a)
    assert cp.exposure_ca(service.points["a"].state, 5.0) == 1560
    assert service.granted("b") == 0


def test_a_vehicle_not_drawing_for_60_s_makes_do_with_6_a():
    """kills: another idle time (``IDLE_AFTER`` changed); ``>`` for ``>=``; the quiet time
    restarted at every step."""
    claims = {"a": Claim(1600, False, 1000, 1000), "b": Claim(1600, True, 1000, 1000)}
    turns = {"a": Turn(served=True, since=0.0), "b": Turn(served=True, since=0.0)}
    now = 0.0
    while now < IDLE_S:  # balanced every 10 s, a not drawing since t = 0
        targets, turns = shares(claims, 2000, turns, now)
        assert targets == {"a": 1000, "b": 1000}, now
        now += 10.0
    targets, _ = shares(claims, 2000, turns, IDLE_S - 0.1)
    assert targets == {"a": 1000, "b": 1000}
    targets, _ = shares(claims, 2000, turns, IDLE_S)
    assert targets == {"a": 600, "b": 1400}


def test_turns_last_15_min_and_a_newcomer_waits_behind_who_waited_longer():
    """One slot (10 A: not two times 6 A). a is served since t = 0, b waits since t = 0.

    kills: another turn length (``ROTATE_AFTER`` changed); a newcomer put before stations that
    wait (its priority ``(1, now)`` changed to ``(0, now)``, ``(1, 0.0)`` or ``(1, -inf)``), or
    before the station in its turn."""
    want = Claim(1600, True, 0, 0)
    turns = {"a": Turn(served=True, since=0.0), "b": Turn(served=False, since=0.0)}
    # c arrives at t = 100 (listed first: a tie would favour it): a keeps its turn
    targets, early = shares({"c": want, "a": want, "b": want}, 1000, turns, 100.0)
    assert targets == {"c": 0, "a": 1000, "b": 0}
    targets, _ = shares({"c": want, "a": want, "b": want}, 1000, early, TURN_S - 0.1)
    assert targets == {"c": 0, "a": 1000, "b": 0}
    # a's turn is over at 15 min: b, which waited longest, not the newcomer d nor c
    claims = {"d": want, "c": want, "a": want, "b": want}
    targets, _ = shares(claims, 1000, early, TURN_S)
    assert targets == {"d": 0, "c": 0, "a": 0, "b": 1000}


def test_a_change_reported_during_a_balance_is_balanced_at_once():
    """b plugs in while a charges alone at 16 A. Lowering a's grant makes a (a station that
    answers at once) apply and report 8 A within the same balance: b must get its 8 A in that
    balance, not at the next one.

    kills: the re-balance after a cap change dropped (``self._again = True`` removed, or one
    pass only)."""
    service = Service(16)
    a = Vehicle(plugged=True)
    service.write("a", 1600)
    service.report("a", a)
    service.command("a", a)
    service.report("a", a)
    assert a.pwm == 26
    point_a = service.points["a"]

    def answer_at_once() -> None:
        service.balance()
        if point_a.state.supply_cap_ca == 800 and a.pwm != 13:
            service.command("a", a)  # the station applies the lower grant ...
            service.report("a", a)  # ... and reports it, all before the balance returns

    point_a.on_change = answer_at_once
    b = Vehicle(plugged=True)
    service.write("b", 1600)
    service.now = 1.0
    service.report("b", b)  # one balance (re-entered by a's report)
    assert a.pwm == 13 and service.granted("a") == 800
    assert service.granted("b") == 800


def test_a_point_that_left_stays_counted_at_every_balance_until_its_station_switched_off():
    """a's charge point is released (gone from the charge points) right after its station
    dropped; the supply re-balances every second: b gets nothing until 360 s after a's last
    report, then its whole share.

    kills: a departed point remembered for one balance only (``_departed`` rebuilt from the
    previous call alone), or counted with no exposure."""
    service = Service(16)
    charging_then_gone(service)
    service.leave("a")
    b = Vehicle(plugged=True)
    service.write("b", 1600)
    service.report("b", b)
    for now in (2.0, 3.0, 4.0, 100.0, SAFETY_STOP_S + MARGIN_S - 1):
        service.now = now
        service.balance()
        assert service.granted("b") == 0, now
    service.now = SAFETY_STOP_S + MARGIN_S + 1
    service.balance()
    assert service.granted("b") == 600  # served at last (6 A: its vehicle drew nothing for 60 s)


# --- 9. random histories, driven as the service drives the supply ------------------------------

KINDS = ["write", "plug", "unplug", "command", "report", "sync", "sync", "drop", "reconnect"]
events = st.lists(
    st.tuples(
        st.sampled_from([*KINDS, "tick"]),
        st.integers(0, 2),
        st.one_of(st.just(0), st.integers(cp.MIN_CURRENT_CA, cp.MAX_CURRENT_CA)),
        st.sampled_from([0.1, 1.0, 7.0, 70.0, 400.0]),
    ),
    min_size=5,
    max_size=60,
)
START = [("reconnect", i, 0, 0.0) for i in range(3)] + [("write", i, 1600, 0.0) for i in range(3)]


def run_service_history(history, limit_ca: int) -> None:
    """Apply the events to three charge points balanced like the service balances them; after
    each, the sum the stations really offer must stay within the limit."""
    service = Service(limit_ca / 100, "012")
    vehicles = [Vehicle() for _ in range(3)]
    link = [False] * 3
    last_report = [0.0] * 3
    for kind, i, centiamps, dt in history:
        key, vehicle = str(i), vehicles[i]
        if kind == "write":
            service.write(key, centiamps)
        elif kind == "plug":
            vehicle.plugged = True
        elif kind == "unplug":
            vehicle.plugged = False
        elif kind in ("command", "sync") and link[i] and service.now - last_report[i] < MARGIN_S:
            # the link sends while its session lives (it collects after every command and
            # drops a station that does not answer): at most this long after the last report
            service.command(key, vehicle)
        if kind in ("report", "sync") and link[i]:
            service.report(key, vehicle)
            last_report[i] = service.now
        if kind == "drop" and link[i]:
            link[i] = False
            service.points[key].disconnected(service.now, "connection lost")
        elif kind == "reconnect" and not link[i]:
            link[i] = True
            service.report(key, vehicle)  # the first thing after a handshake
            last_report[i] = service.now
        elif kind == "tick":
            service.now += dt
            for j, point in service.points.items():
                point.tick(service.now)
                away = service.now - last_report[int(j)]
                if not link[int(j)] and away > SAFETY_STOP_S:  # the station's own safety stop
                    vehicles[int(j)].pwm, vehicles[int(j)].contactor = cp.PWM_OFF, False
            service.balance()  # the service's once-a-second balance
        offered = sum(v.offered_ca() for v in vehicles)
        assert offered <= limit_ca, [
            (v.pwm, p.state.supply_cap_ca)
            for v, p in zip(vehicles, service.points.values(), strict=True)
        ]


@settings(max_examples=500, deadline=None)
@given(events, st.integers(cp.MIN_CURRENT_CA, 4000))
# a is granted 16 A, reports once more before it applies its PWM, applies it and drops: b must
# not be granted the whole supply while a's station still offers 15.6 A (31.2 A on 16 A)
@example(
    [
        ("plug", 0, 0, 0.0),
        ("report", 0, 0, 0.0),
        ("report", 0, 0, 0.0),
        ("command", 0, 0, 0.0),
        ("drop", 0, 0, 0.0),
        ("plug", 1, 0, 0.0),
        ("report", 1, 0, 0.0),
        ("command", 1, 0, 0.0),
    ],
    1600,
)
def test_the_sum_offered_stays_within_the_limit_when_driven_like_the_service(history, limit):
    """kills: a report that forgets the grant not yet reported on (``observe`` setting
    ``supply_exposure_ca`` to 0 instead of the current grant), which the per-step
    ``set_supply_cap`` of tests/test_supply.py hides; and the other exposure mutations above."""
    run_service_history([*START, *history], limit)
