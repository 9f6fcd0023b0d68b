"""The shared supply limit: fair shares, rotation, and the sum offered never above the limit."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from openwb_modbus_evse import chargepoint as cp
from openwb_modbus_evse.evse.protocol import Pilot, Proximity, StationData
from openwb_modbus_evse.supply import (
    IDLE_AFTER,
    ROTATE_AFTER,
    Claim,
    SupplyLimit,
    Turn,
    allocate,
    claim,
    grant,
    shares,
)

demands = st.one_of(st.just(0), st.integers(cp.MIN_CURRENT_CA, cp.MAX_CURRENT_CA))
claims_st = st.dictionaries(
    st.sampled_from("abcdefgh"),
    st.builds(Claim, demands, st.booleans(), st.just(0), st.just(0)),
    min_size=1,
)
turns_st = st.dictionaries(
    st.sampled_from("abcdefgh"),
    st.builds(Turn, st.booleans(), st.floats(0, 5000), st.one_of(st.none(), st.floats(0, 5000))),
)


@given(claims_st, st.integers(cp.MIN_CURRENT_CA, 10_000), turns_st, st.floats(5000, 6000))
def test_shares_are_fair_and_within_the_limit(claims, limit, turns, now):
    targets, new_turns = shares(claims, limit, turns, now)
    assert sum(targets.values()) <= limit
    for key, target in targets.items():
        assert target == 0 or cp.MIN_CURRENT_CA <= target <= claims[key].demand_ca
    wanting = [k for k, c in claims.items() if c.demand_ca]
    served = [k for k in wanting if targets[k]]
    # as many as fit at 6 A each are served, and nobody gets less than another unless it wants
    # less or is idle (give or take the centiamps of integer division)
    assert len(served) == min(len(wanting), limit // cp.MIN_CURRENT_CA)
    for a in served:
        for b in served:
            assert (
                targets[a] >= targets[b] - 1
                or targets[a] == claims[a].demand_ca
                or (turns.get(a) and turns[a].quiet_since is not None)
            )
    assert set(new_turns) == set(wanting)
    if not turns and sum(claims[k].demand_ca for k in wanting) <= limit:
        assert all(targets[k] == claims[k].demand_ca for k in wanting)


def test_equal_split_and_redistribution_when_a_vehicle_stops_drawing():
    full = {"a": Claim(1600, True, 0, 0), "b": Claim(1600, True, 0, 0)}
    targets, turns = shares(full, 2000, {}, 0.0)
    assert targets == {"a": 1000, "b": 1000}
    # b's vehicle stops drawing: after IDLE_AFTER it keeps 6 A, a gets the rest
    quiet = {**full, "b": Claim(1600, False, 1000, 1000)}
    targets, turns = shares(quiet, 2000, turns, 10.0)
    assert targets == {"a": 1000, "b": 1000}
    targets, turns = shares(quiet, 2000, turns, 10.0 + IDLE_AFTER)
    assert targets == {"a": 1400, "b": 600}
    # it draws again: equal shares again
    targets, _ = shares(full, 2000, turns, 20.0 + IDLE_AFTER)
    assert targets == {"a": 1000, "b": 1000}


def test_a_vehicle_quiet_since_time_zero_is_idle_after_idle_after():
    claims = {"a": Claim(1600, False, 1600, 1600), "b": Claim(1600, True, 0, 0)}
    turns = {"a": Turn(served=True, since=0.0, quiet_since=0.0)}
    targets, turns = shares(claims, 2200, turns, IDLE_AFTER / 2)
    assert turns["a"].quiet_since == 0.0
    targets, _ = shares(claims, 2200, turns, IDLE_AFTER)
    assert targets == {"a": 600, "b": 1600}


def test_who_cannot_get_6_a_waits_and_takes_a_turn():
    three = {k: Claim(1600, True, 0, 0) for k in "abc"}
    turns: dict[str, Turn] = {}
    served_at: dict[str, list[float]] = {k: [] for k in "abc"}
    now = 0.0
    while now < 4 * ROTATE_AFTER:
        targets, turns = shares(three, 1600, turns, now)
        assert sorted(targets.values()) == [0, 800, 800]
        for key, target in targets.items():
            if target:
                served_at[key].append(now)
        now += 30.0
    for times in served_at.values():  # everyone charged, and never waited much longer than a turn
        gaps = [b - a for a, b in itertools.pairwise([0.0, *times, now])]
        assert times and max(gaps) < 2.1 * ROTATE_AFTER


@given(
    st.dictionaries(
        st.sampled_from("abcdef"),
        st.tuples(demands, demands, st.integers(0, 3200)),  # demand, cap, exposure
        min_size=1,
    ),
    st.integers(cp.MIN_CURRENT_CA, 8000),
)
# a lowers from 12 A: the 6 A left free go to b or to c, not to both
@example({"a": (0, 0, 1200), "b": (600, 0, 0), "c": (600, 0, 0)}, 1800)
@settings(max_examples=1000)
def test_grant_never_raises_the_sum_of_what_may_be_offered_above_the_limit(raw, limit):
    claims = {k: Claim(d, True, cap, exp) for k, (d, cap, exp) in raw.items()}
    before = sum(max(c.cap_ca, c.exposure_ca) for c in claims.values())
    targets, _ = shares(claims, limit, {}, 0.0)
    caps = grant(claims, targets, limit)
    after = sum(max(caps[k], c.exposure_ca) for k, c in claims.items())
    assert after <= max(before, limit)
    for key, c in claims.items():
        assert caps[key] <= max(c.cap_ca, targets[key])  # raised to the target at most
        if targets[key] <= c.cap_ca:
            assert caps[key] == targets[key]  # lowered at once
        assert caps[key] == 0 or caps[key] >= cp.MIN_CURRENT_CA


# --- the state machine and the allocation together, over random histories ----------------------

CONFIG = cp.ChargePointConfig(supply_limited=True, stop_timeout=6.0)


def report(pwm: int, contactor: bool, plugged: bool) -> StationData:
    """What a station with this PWM and contactor reports; its vehicle, when plugged in, asks for
    power while a current is offered and draws all of it once the contactor is closed."""
    offered = round(cp.offered_amps(pwm) * 100)
    pilot = Pilot.A_12V if not plugged else Pilot.C_6V if offered else Pilot.B_9V
    amps = offered * 10 if contactor and pilot is Pilot.C_6V else 0
    return StationData(
        contactor=contactor,
        pwm=pwm,
        pilot=pilot,
        proximity=Proximity.CABLE_32A,
        voltages_mv=(230_000,) * 3,
        currents_ma=(amps, amps, amps),
        rssi_dbm=-60,
        uptime_ms=0,
    )


class Station:
    """A station and vehicle as the bridge sees them through reports."""

    def __init__(self) -> None:
        self.state = cp.initial_state(CONFIG)
        self.pwm = cp.PWM_OFF
        self.contactor = False
        self.plugged = False
        self.link = False  # TCP session up
        self.last_report = 0.0

    def offered_ca(self) -> int:
        return round(cp.offered_amps(self.pwm) * 100)

    def data(self) -> StationData:
        return report(self.pwm, self.contactor, self.plugged)


KINDS = ["write", "plug", "unplug", "command", "report", "sync", "sync", "sync", "drop"]
events = st.lists(
    st.tuples(
        st.sampled_from([*KINDS, "reconnect", "reconnect", "tick"]),
        st.integers(0, 2),
        st.one_of(st.just(0), st.integers(cp.MIN_CURRENT_CA, cp.MAX_CURRENT_CA)),
        st.sampled_from([0.1, 1.0, 7.0, 70.0, 400.0]),
    ),
    min_size=5,
    max_size=60,
)


def run_history(history, limit: int) -> None:
    """Apply the events; after each, balance and check the sum the stations really offer."""
    stations = [Station() for _ in range(3)]
    turns: dict[int, Turn] = {}
    now = 0.0

    def balance() -> None:
        nonlocal turns
        claims = {i: claim(s.state, now) for i, s in enumerate(stations)}
        caps, turns = allocate(claims, limit, turns, now)
        for i, cap in caps.items():
            stations[i].state = cp.set_supply_cap(stations[i].state, cap, now)

    for kind, i, centiamps, dt in history:
        s = stations[i]
        if kind == "write":
            s.state = cp.set_current(s.state, centiamps, now)
        elif kind == "plug":
            s.plugged = True
        elif kind == "unplug":
            s.plugged = False
        elif kind in ("command", "sync") and s.link and now - s.last_report < cp.SAFETY_MARGIN_S:
            # the link sends what the state machine wants, then collects (a "report" event)
            want = cp.target(s.state, now)
            if want is not None:
                s.pwm, s.contactor = want.pwm, want.contactor
        if kind in ("report", "sync") and s.link:
            s.state = cp.observe(s.state, s.data(), now)
            s.last_report = now
        if kind == "drop" and s.link:
            s.link = False
            s.state = cp.disconnect(s.state, now)
        elif kind == "reconnect" and not s.link:
            s.link = True
            s.state = cp.observe(s.state, s.data(), now)  # the first thing after a handshake
            s.last_report = now
        elif kind == "tick":
            now += dt
            for st_ in stations:
                st_.state = cp.tick(st_.state, now)
                if not st_.link and now - st_.last_report > 300:  # the station's safety net
                    st_.pwm, st_.contactor = cp.PWM_OFF, False
        balance()
        offered = sum(st_.offered_ca() for st_ in stations)
        assert offered <= limit, [(st_.pwm, st_.state.supply_cap_ca) for st_ in stations]


@settings(max_examples=500, deadline=None)
@given(events, st.integers(cp.MIN_CURRENT_CA, 4000))
def test_the_sum_offered_never_exceeds_the_limit_whatever_happens(history, limit):
    # every station connected with a controller asking 16 A: the random part then mostly plugs,
    # commands, reports and drops, which is where the limit is tested
    start = [("reconnect", i, 0, 0) for i in range(3)] + [("write", i, 1600, 0) for i in range(3)]
    run_history([*start, *history], limit)


def test_one_station_is_lowered_before_another_is_raised():
    """A charges alone at 16 A; B plugs in: B gets current only once A reports it lowered."""
    start = [("reconnect", i, 0, 0) for i in (0, 1)] + [("write", i, 1600, 0) for i in (0, 1)]
    a_alone = [("plug", 0, 0, 0), ("sync", 0, 0, 0), ("sync", 0, 0, 0), ("sync", 0, 0, 0)]
    # B: plugged and reported; B's link sends before A's has lowered A's PWM
    b_joins = [("plug", 1, 0, 0), ("report", 1, 0, 0), ("command", 1, 0, 0), ("command", 0, 0, 0)]
    run_history([*start, *a_alone, *b_joins, ("report", 0, 0, 0), ("sync", 1, 0, 0)], 1600)


def test_a_grant_counts_until_the_station_has_reported_on_it():
    """A is granted 16 A and commanded, but not yet reported on, when B plugs in."""
    start = [("reconnect", i, 0, 0) for i in (0, 1)] + [("write", i, 1600, 0) for i in (0, 1)]
    a_granted = [("plug", 0, 0, 0), ("report", 0, 0, 0), ("command", 0, 0, 0)]
    b_joins = [("plug", 1, 0, 0), ("report", 1, 0, 0), ("tick", 0, 0, 0.1), ("command", 1, 0, 0)]
    run_history([*start, *a_granted, *b_joins, ("sync", 0, 0, 0), ("sync", 1, 0, 0)], 1600)


def test_the_per_state_cap_limits_the_pwm():
    state = replace(
        cp.initial_state(CONFIG),
        requested_ca=1600,
        connected=True,
        data=Station().data(),
    )
    assert cp.offered_pwm(state) == cp.PWM_OFF  # no grant yet: nothing
    state = cp.set_supply_cap(state, 1000, 0.0)
    assert cp.offered_pwm(state) == 16  # 10 A granted: 9.6 A offered
    assert cp.offered_pwm(replace(state, supply_cap_ca=None)) == 26  # no supply limit


def test_a_charge_point_that_is_gone_keeps_its_current_counted():
    """A station charging at 16 A drops its connection and its charge point is released (or
    forgotten): the station keeps offering 16 A until its own safety timeout, so another station
    gets nothing of a 16 A supply until then."""
    supply = SupplyLimit(16)
    config = replace(CONFIG, max_current_a=16)
    points = {}
    for serial in ("a", "b"):
        points[serial] = cp.ChargePoint(cp.Identity(serial, None, serial, serial), config)
        points[serial].commit(cp.set_current(points[serial].state, 1600, 0.0))
    a, b = points["a"], points["b"]
    station = Station()
    station.plugged = station.contactor = True
    station.pwm = 26
    a.observe(station.data(), 0.0)
    supply.balance([a], 0.0)
    assert a.state.supply_cap_ca == 1600
    a.disconnected(1.0, "connection lost")
    supply.balance([a], 1.0)
    waiting = Station()
    waiting.plugged = True
    b.observe(waiting.data(), 2.0)

    supply.balance([b], 2.0)  # a is gone from the charge points
    assert b.state.supply_cap_ca == 0
    later = cp.STATION_SAFETY_TIMEOUT + cp.SAFETY_MARGIN_S + 1.0
    supply.balance([b], later)  # a has switched off by itself: b is served (idle: 6 A)
    assert b.state.supply_cap_ca == cp.MIN_CURRENT_CA


def test_only_a_connected_station_with_a_vehicle_plugged_in_asks_for_a_share():
    plugged = Station()
    plugged.plugged = True
    state = cp.observe(cp.set_current(cp.initial_state(CONFIG), 1600, 0.0), plugged.data(), 0.0)
    assert claim(state, 0.0).demand_ca == 1600
    assert claim(cp.disconnect(state, 1.0), 1.0).demand_ca == 0
    assert claim(cp.observe(state, Station().data(), 1.0), 1.0).demand_ca == 0  # unplugged
