"""OCPP smart charging, pure: stacking, Absolute/Recurring/Relative, A and W, numberPhases."""

from __future__ import annotations

import pytest

from openwb_modbus_evse.interfaces import ocpp_profiles as prof

T0 = prof.parse_time("2026-06-01T00:00:00Z")  # a Monday


def profile(
    purpose="TxDefaultProfile",
    *,
    pid=1,
    level=0,
    kind="Absolute",
    periods=((0, 16),),
    unit="A",
    connector=1,
    start=T0,
    duration=None,
    **extra,
):
    schedule = {
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [
            {"startPeriod": s, "limit": limit, **({"numberPhases": ph[0]} if ph else {})}
            for s, limit, *ph in periods
        ],
    }
    if start is not None:
        schedule["startSchedule"] = prof.format_time(start)
    if duration is not None:
        schedule["duration"] = duration
    raw = {
        "chargingProfileId": pid,
        "stackLevel": level,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": schedule,
        **extra,
    }
    return prof.parse(connector, raw, T0)


def amps(profiles, at, **kw):
    return prof.limit_at(profiles, at, phases=kw.pop("phases", 3), **kw).amps


def test_absolute_periods_and_duration():
    p = profile(periods=((0, 16), (3600, 0), (7200, 10)), duration=10800)
    assert amps([p], T0 - 1) is None  # not begun
    assert amps([p], T0) == 16
    assert amps([p], T0 + 3600) == 0  # a 0 A period pauses
    assert amps([p], T0 + 7300) == 10
    assert amps([p], T0 + 10800) is None  # ended
    assert prof.next_change([p], T0 + 10) == T0 + 3600
    assert prof.next_change([p], T0 + 7300) == T0 + 10800


def test_stack_levels_fall_through_when_the_higher_one_ends():
    low = profile(pid=1, level=0, periods=((0, 20),), start=T0)
    high = profile(pid=2, level=5, periods=((0, 8),), start=T0, duration=600)
    assert amps([low, high], T0 + 10) == 8
    assert amps([low, high], T0 + 600) == 20
    assert prof.next_change([low, high], T0 + 10) == T0 + 600


def test_charge_point_max_caps_and_tx_profile_replaces_tx_default():
    cap = profile("ChargePointMaxProfile", pid=1, connector=0, periods=((0, 13),))
    default = profile(pid=2, periods=((0, 20),))
    tx = profile("TxProfile", pid=3, kind="Relative", start=None, periods=((0, 6),))
    assert amps([cap, default], T0 + 1) == 13
    assert amps([cap, default, tx], T0 + 1) == 13  # no transaction: no TxProfile
    assert amps([cap, default, tx], T0 + 1, tx_id=5, tx_start=T0) == 6


def test_recurring_daily_and_weekly():
    daily = profile(
        kind="Recurring", recurrencyKind="Daily", periods=((0, 6), (8 * 3600, 16)), start=T0
    )
    assert amps([daily], T0 + 3 * 86400 + 3600) == 6
    assert amps([daily], T0 + 3 * 86400 + 9 * 3600) == 16
    assert amps([daily], T0 - 3600) == 16  # before startSchedule: yesterday's run
    assert prof.next_change([daily], T0 + 86400 + 9 * 3600) == T0 + 2 * 86400
    weekly = profile(kind="Recurring", recurrencyKind="Weekly", periods=((0, 0), (86400, 10)))
    assert amps([weekly], T0 + 7 * 86400 + 100) == 0
    assert amps([weekly], T0 + 8 * 86400 + 100) == 10


def test_relative_starts_with_the_transaction():
    p = profile(kind="Relative", start=None, periods=((0, 10), (1800, 16)))
    assert amps([p], T0 + 1000, tx_id=1, tx_start=T0) == 10
    assert amps([p], T0 + 2000, tx_id=1, tx_start=T0) == 16


def test_watts_with_the_phases_and_number_phases():
    p = profile(unit="W", periods=((0, 11040),))
    assert amps([p], T0, phases=3) == pytest.approx(16)
    assert amps([p], T0, phases=1) == pytest.approx(48)
    one = profile(unit="W", periods=((0, 3680, 1),))
    limit = prof.limit_at([one], T0, phases=3)
    assert limit.amps == pytest.approx(16) and limit.phases == 1


def test_valid_from_and_to():
    p = profile(validFrom=prof.format_time(T0 + 100), validTo=prof.format_time(T0 + 200), start=T0)
    assert amps([p], T0 + 50) is None
    assert amps([p], T0 + 150) == 16
    assert amps([p], T0 + 250) is None
    assert prof.next_change([p], T0 + 50) == T0 + 100


def test_install_replaces_same_id_or_same_level_and_purpose():
    a = profile(pid=1, level=0)
    b = profile(pid=2, level=1)
    c = profile(pid=3, level=1)  # same level, purpose, connector as b
    installed = prof.install(prof.install(prof.install([], a), b), c)
    assert [p.id for p in installed] == [1, 3]
    assert [p.id for p in prof.clear(installed, purpose="TxDefaultProfile", stack_level=0)] == [3]
    assert prof.clear(installed) == []


@pytest.mark.parametrize(
    "change",
    [
        {"chargingProfilePurpose": "ChargePointMaxProfile"},  # on connector 1
        {"stackLevel": 99},
        {"chargingProfileKind": "Recurring"},  # without recurrencyKind
        {"chargingSchedule": {"chargingRateUnit": "A", "chargingSchedulePeriod": []}},
        {
            "chargingSchedule": {
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [
                    {"startPeriod": 10, "limit": 6},
                ],
            }
        },
    ],
)
def test_profiles_that_are_rejected(change):
    raw = {
        "chargingProfileId": 1,
        "stackLevel": 0,
        "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6}],
        },
        **change,
    }
    with pytest.raises(prof.ProfileError):
        prof.parse(1, raw, T0)


def test_composite_schedule():
    cap = profile("ChargePointMaxProfile", pid=1, connector=0, periods=((0, 13),))
    p = profile(pid=2, periods=((0, 16), (600, 6), (1200, 20)), duration=1800)
    periods = prof.composite([cap, p], T0, 3600, phases=3)
    assert [(q.start, q.limit) for q in periods] == [(0, 13), (600, 6), (1200, 13)]
    watts = prof.composite([p], T0, 900, phases=3, unit="W")
    assert [(q.start, q.limit) for q in watts] == [(0, 11040), (600, 4140)]


def test_reconnect_backoff_spreads_and_is_capped():
    import random

    from openwb_modbus_evse.interfaces.ocpp import backoff

    rng = random.Random(7)
    first = sorted(backoff(0, 60, rng) for _ in range(200))
    assert first[0] >= 0.4 and first[-1] <= 4.0
    # 200 stations after a central-system restart: never more than ~15 within 100 ms.
    assert max(sum(1 for t in first if a <= t < a + 0.1) for a in first) <= 15
    assert all(6 <= backoff(n, 60, rng) <= 60 for n in range(5, 40))
    assert max(backoff(3, 10, rng) for _ in range(50)) <= 10


def test_absolute_without_start_schedule_starts_when_set_and_keeps_that_start():
    """evcc sends Absolute TxDefaultProfiles without startSchedule: they start when set, also
    after a restart (the state file keeps when)."""
    p = profile(start=None, periods=((0, 0), (600, 16)))
    assert amps([p], T0 + 1) == 0 and amps([p], T0 + 601) == 16
    raw = {**p.raw, "_installedAt": p.installed_at}
    again = prof.parse(1, raw, T0 + 10_000)  # loaded later
    assert again.installed_at == T0
    assert amps([again], T0 + 601) == 16
