"""OCPP 1.6 smart charging, pure: stored charging profiles -> the current limit at a time.

A profile is parsed once from its OCPP JSON (:func:`parse`) into a frozen :class:`Profile`; the
limit at a time (:func:`limit_at`) follows OCPP 1.6 section 3.13:

- per purpose, the valid profile with the highest ``stackLevel`` whose schedule covers the time
  wins (a schedule that has ended, or not begun, leaves the time to lower stack levels);
- a TxProfile of the running transaction replaces the TxDefaultProfile;
- the ChargePointMaxProfile caps the result.

Absolute schedules start at ``startSchedule`` (or when the profile was set), Recurring ones at
``startSchedule`` repeated daily or weekly, Relative ones at the start of the transaction
(without one: now, so the first period applies; Home Assistant's ocpp integration sends its
ChargePointMaxProfile so). Limits in W are converted to A with the period's ``numberPhases``
(else the station's phases) and 230 V per phase: stations report no power factor, so this is
the nominal conversion.

Times are wall-clock seconds (epoch). :func:`next_change` says when the limit may change by
time alone, so a caller evaluates again at that boundary instead of polling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

NOMINAL_VOLTAGE = 230.0
DAY, WEEK = 86400.0, 7 * 86400.0
CP_MAX, TX_DEFAULT, TX = "ChargePointMaxProfile", "TxDefaultProfile", "TxProfile"
PURPOSES = (CP_MAX, TX_DEFAULT, TX)
MAX_STACK_LEVEL = 8
MAX_PERIODS = 48
MAX_PROFILES = 16


class ProfileError(ValueError):
    """A profile this charge point cannot take (the answer is Rejected)."""


@dataclass(frozen=True)
class Period:
    """One period of a schedule: from ``start`` seconds on, ``limit`` in the schedule's unit."""

    start: float
    limit: float
    phases: int | None = None


@dataclass(frozen=True)
class Profile:
    """One installed charging profile."""

    id: int
    connector: int
    stack_level: int
    purpose: str
    kind: str  # Absolute, Recurring, Relative
    recurrency: str | None  # Daily, Weekly
    valid_from: float | None
    valid_to: float | None
    transaction_id: int | None
    start: float | None  # startSchedule
    duration: float | None
    unit: str  # A or W
    periods: tuple[Period, ...]
    min_rate: float | None
    installed_at: float  # when it was set (the start of an Absolute schedule without one)
    raw: dict[str, Any]  # as received, for the state file


def parse_time(text: str) -> float:
    """An OCPP dateTime (RFC 3339) as epoch seconds; naive times are UTC."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        raise ProfileError(f"not a date and time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(epoch: float) -> str:
    """Epoch seconds as an OCPP dateTime (UTC, ``Z``)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse(connector: int, raw: dict[str, Any], now: float) -> Profile:
    """A ``csChargingProfiles`` object (camelCase, schema-valid) sent for ``connector``."""
    try:
        schedule = raw["chargingSchedule"]
        purpose = raw["chargingProfilePurpose"]
        kind = raw["chargingProfileKind"]
        periods = tuple(
            Period(float(p["startPeriod"]), float(p["limit"]), p.get("numberPhases"))
            for p in schedule["chargingSchedulePeriod"]
        )
        profile = Profile(
            id=int(raw["chargingProfileId"]),
            connector=connector,
            stack_level=int(raw["stackLevel"]),
            purpose=purpose,
            kind=kind,
            recurrency=raw.get("recurrencyKind"),
            valid_from=_time(raw.get("validFrom")),
            valid_to=_time(raw.get("validTo")),
            transaction_id=raw.get("transactionId"),
            start=_time(schedule.get("startSchedule")),
            duration=schedule.get("duration"),
            unit=schedule["chargingRateUnit"],
            periods=periods,
            min_rate=schedule.get("minChargingRate"),
            installed_at=float(raw.get("_installedAt", now)),
            raw=raw,
        )
    except (KeyError, TypeError) as err:
        raise ProfileError(f"incomplete charging profile ({err})") from None
    _check(profile)
    return profile


def _time(text: str | None) -> float | None:
    return None if text is None else parse_time(text)


def _check(p: Profile) -> None:
    if p.purpose not in PURPOSES:
        raise ProfileError(f"unknown purpose {p.purpose}")
    if p.purpose == CP_MAX and p.connector != 0:
        raise ProfileError("a ChargePointMaxProfile must be set on connector 0")
    if p.purpose == TX and p.connector == 0:
        raise ProfileError("a TxProfile needs a connector")
    if not 0 <= p.stack_level <= MAX_STACK_LEVEL:
        raise ProfileError(f"stackLevel must be 0..{MAX_STACK_LEVEL}")
    if p.kind == "Recurring" and p.recurrency not in ("Daily", "Weekly"):
        raise ProfileError("a Recurring profile needs recurrencyKind Daily or Weekly")
    if p.kind == "Recurring" and p.start is None:
        raise ProfileError("a Recurring profile needs startSchedule")
    if p.unit not in ("A", "W"):
        raise ProfileError(f"unknown chargingRateUnit {p.unit}")
    if not p.periods or len(p.periods) > MAX_PERIODS:
        raise ProfileError(f"a schedule needs 1..{MAX_PERIODS} periods")
    starts = [q.start for q in p.periods]
    if starts[0] != 0 or starts != sorted(set(starts)):
        raise ProfileError("periods must start at 0 and be in increasing order")
    for q in p.periods:
        if q.limit < 0 or not math.isfinite(q.limit):
            raise ProfileError("a limit must not be negative")
        if q.phases is not None and q.phases not in (1, 2, 3):
            raise ProfileError("numberPhases must be 1..3")


def install(profiles: list[Profile], new: Profile) -> list[Profile]:
    """The profiles after setting ``new``: it replaces one with its id, or one with the same
    stack level, purpose and connector (OCPP 1.6, 3.13.2)."""
    kept = [
        p
        for p in profiles
        if p.id != new.id
        and not (
            p.stack_level == new.stack_level
            and p.purpose == new.purpose
            and p.connector == new.connector
        )
    ]
    if len(kept) >= MAX_PROFILES:
        raise ProfileError(f"at most {MAX_PROFILES} profiles can be installed")
    return [*kept, new]


def clear(
    profiles: list[Profile],
    *,
    id: int | None = None,
    connector: int | None = None,
    purpose: str | None = None,
    stack_level: int | None = None,
) -> list[Profile]:
    """The profiles after ClearChargingProfile with these criteria (none: all)."""
    if id is not None:
        return [p for p in profiles if p.id != id]
    return [
        p
        for p in profiles
        if not (
            (connector is None or p.connector == connector)
            and (purpose is None or p.purpose == purpose)
            and (stack_level is None or p.stack_level == stack_level)
        )
    ]


def _schedule_start(p: Profile, now: float, tx_start: float | None) -> float | None:
    """When the schedule's current run began (None: it does not run now)."""
    if p.kind == "Relative":
        return tx_start if tx_start is not None else now
    if p.kind == "Recurring":
        assert p.start is not None
        period = DAY if p.recurrency == "Daily" else WEEK
        if now < p.start:
            return p.start - period * math.ceil((p.start - now) / period)
        return p.start + period * math.floor((now - p.start) / period)
    return p.start if p.start is not None else p.installed_at


def _amps(p: Profile, period: Period, phases: int) -> float:
    if p.unit == "A":
        return period.limit
    return period.limit / (NOMINAL_VOLTAGE * (period.phases or phases))


def _period_at(p: Profile, now: float, tx_start: float | None) -> tuple[Period, float] | None:
    """The period of ``p`` in force at ``now`` and when its schedule run began."""
    if p.valid_from is not None and now < p.valid_from:
        return None
    if p.valid_to is not None and now >= p.valid_to:
        return None
    start = _schedule_start(p, now, tx_start)
    if start is None or now < start:
        return None
    offset = now - start
    if p.duration is not None and offset >= p.duration:
        return None
    found = None
    for period in p.periods:
        if period.start <= offset:
            found = period
    return (found, start) if found is not None else None


@dataclass(frozen=True)
class Limit:
    """What the profiles allow at a time: amps (None: no profile limits) and the phases."""

    amps: float | None
    phases: int | None = None


def _applies(p: Profile, connector: int, tx_id: int | None) -> bool:
    if p.purpose == TX:
        return (
            tx_id is not None
            and p.connector == connector
            and (p.transaction_id is None or p.transaction_id == tx_id)
        )
    if p.purpose == TX_DEFAULT:
        return p.connector in (0, connector)
    return p.connector == 0


def _winner(
    profiles: list[Profile],
    purpose: str,
    connector: int,
    now: float,
    tx_id: int | None,
    tx_start: float | None,
) -> tuple[Profile, Period] | None:
    best: tuple[Profile, Period] | None = None
    for p in profiles:
        if p.purpose != purpose or not _applies(p, connector, tx_id):
            continue
        found = _period_at(p, now, tx_start)
        if found is None:
            continue
        # Same stack level on connector 1 and 0 (TxDefault): the connector's own one wins.
        key = (p.stack_level, p.connector)
        if best is None or key > (best[0].stack_level, best[0].connector):
            best = (p, found[0])
    return best


def limit_at(
    profiles: list[Profile],
    now: float,
    *,
    phases: int,
    connector: int = 1,
    tx_id: int | None = None,
    tx_start: float | None = None,
) -> Limit:
    """The limit the profiles set at ``now`` for a station wired for ``phases``."""
    amps: float | None = None
    limit_phases: int | None = None
    tx = _winner(profiles, TX, connector, now, tx_id, tx_start) if tx_id is not None else None
    chosen = tx or _winner(profiles, TX_DEFAULT, connector, now, tx_id, tx_start)
    for found in (chosen, _winner(profiles, CP_MAX, connector, now, tx_id, tx_start)):
        if found is None:
            continue
        p, period = found
        value = _amps(p, period, phases)
        if amps is None or value < amps:
            amps = value
        if period.phases is not None:
            limit_phases = (
                period.phases if limit_phases is None else min(limit_phases, period.phases)
            )
    return Limit(amps, limit_phases)


def next_change(
    profiles: list[Profile], now: float, *, tx_start: float | None = None
) -> float | None:
    """The earliest time after ``now`` at which some profile's period, validity or run changes
    (None: none does by time alone)."""
    candidates: list[float] = []
    for p in profiles:
        for edge in (p.valid_from, p.valid_to):
            if edge is not None and edge > now:
                candidates.append(edge)
        start = _schedule_start(p, now, tx_start)
        if start is None:
            continue
        if p.kind == "Recurring":
            candidates.append(start + (DAY if p.recurrency == "Daily" else WEEK))
        edges = [start + q.start for q in p.periods]
        if p.duration is not None:
            edges.append(start + p.duration)
        candidates.extend(edge for edge in edges if edge > now)
    return min(candidates) if candidates else None


def composite(
    profiles: list[Profile],
    start: float,
    duration: float,
    *,
    phases: int,
    connector: int = 1,
    tx_id: int | None = None,
    tx_start: float | None = None,
    unit: str = "A",
) -> list[Period]:
    """The composite schedule from ``start`` for ``duration`` seconds (GetCompositeSchedule):
    the limit at each boundary; a time without any profile is left out as "no limit" by
    repeating nothing (the caller offers the station's maximum there)."""
    periods: list[Period] = []
    now = start
    end = start + duration
    while now < end and len(periods) < MAX_PERIODS:
        limit = limit_at(
            profiles, now, phases=phases, connector=connector, tx_id=tx_id, tx_start=tx_start
        )
        if limit.amps is not None:
            value = limit.amps
            if unit == "W":
                value = limit.amps * NOMINAL_VOLTAGE * (limit.phases or phases)
            value = round(value, 1)
            if not periods or periods[-1].limit != value or periods[-1].phases != limit.phases:
                periods.append(Period(now - start, value, limit.phases))
        following = next_change(profiles, now, tx_start=tx_start)
        if following is None:
            break
        now = following
    return periods
