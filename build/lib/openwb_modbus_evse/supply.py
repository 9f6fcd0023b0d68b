"""One supply shared by several stations: how much current each may offer.

``supply_max_current`` (A per phase) caps the sum of the currents offered to all stations, whatever
the controllers write. This module is pure (state in, decision out, ``now`` given):

- :func:`shares` splits the limit fairly among the stations that want current: equal shares,
  none above what a station wants, none below 6 A. If not everyone can get 6 A, the ones left
  out wait (PWM 100 %) and take turns: a station that has been served for ``ROTATE_AFTER``
  yields its place to the one that has waited longest. A vehicle that is offered current but
  does not draw it for ``IDLE_AFTER`` (full, or not charging yet) is asked to make do with 6 A.
- :func:`grant` turns the shares into caps without ever exceeding the limit in between: a cap
  goes down at once, but goes up only as far as the others' exposure allows, i.e. the most each
  may still be offering (its reported PWM, or a higher grant the station has not yet reported
  on). So one station's current is lowered before another's is raised.

:class:`SupplyLimit` applies both to the live charge points.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from . import chargepoint as cp

ROTATE_AFTER = 900.0  # seconds a station charges before it yields to a waiting one
IDLE_AFTER = 60.0  # seconds offered current without drawing it before its share shrinks to 6 A


@dataclass(frozen=True)
class Claim:
    """One station as the allocation sees it (centiamps)."""

    demand_ca: int  # what it may and wants to offer; 0: no vehicle or nothing allowed
    drawing: bool  # its vehicle draws current now
    cap_ca: int  # its grant now
    exposure_ca: int  # the most it may be offering now


@dataclass(frozen=True)
class Turn:
    """A station's place in the rotation."""

    served: bool
    since: float  # served or waiting since
    quiet_since: float | None = None  # served but not drawing since


def shares(
    claims: Mapping[str, Claim], limit_ca: int, turns: Mapping[str, Turn], now: float
) -> tuple[dict[str, int], dict[str, Turn]]:
    """Fair shares of ``limit_ca`` (each 0 or at least 6 A) and the rotation after this step."""
    wants: dict[str, int] = {}
    quiet: dict[str, float | None] = {}  # served and offered current, but not drawing, since
    for key, claim in claims.items():
        if claim.demand_ca <= 0:
            continue
        turn = turns.get(key)
        served = turn is not None and turn.served
        since = None
        if served and not claim.drawing:  # "is None", not "or": quiet since t = 0.0 is quiet
            assert turn is not None
            since = now if turn.quiet_since is None else turn.quiet_since
        quiet[key] = since
        idle = since is not None and now - since >= IDLE_AFTER
        wants[key] = min(claim.demand_ca, cp.MIN_CURRENT_CA) if idle else claim.demand_ca

    slots = limit_ca // cp.MIN_CURRENT_CA
    chosen = list(wants)
    if len(chosen) > slots:

        def priority(key: str) -> tuple[int, float]:
            turn = turns.get(key)
            if turn is None:
                return (1, now)  # a newcomer waits behind those who waited longer
            if turn.served:
                return (0 if now - turn.since < ROTATE_AFTER else 2, turn.since)
            return (1, turn.since)

        chosen = sorted(chosen, key=priority)[:slots]

    targets = dict.fromkeys(claims, 0)
    remaining = limit_ca
    ordered = sorted(chosen, key=lambda k: wants[k])
    for i, key in enumerate(ordered):
        give = min(wants[key], remaining // (len(ordered) - i))
        targets[key] = give
        remaining -= give

    new_turns: dict[str, Turn] = {}
    for key in wants:
        turn = turns.get(key)
        served = key in chosen
        if turn is None or turn.served != served:
            turn = Turn(served=served, since=now)
        if served:
            since = quiet[key]
            if claims[key].drawing:
                since = None
            elif since is None:
                since = now
            turn = replace(turn, quiet_since=since)
        new_turns[key] = turn
    return targets, new_turns


def grant(claims: Mapping[str, Claim], targets: Mapping[str, int], limit_ca: int) -> dict[str, int]:
    """Caps to set now: decreases at once, increases only within what the others leave free."""
    exposure = {k: max(c.exposure_ca, c.cap_ca) for k, c in claims.items()}
    headroom = limit_ca - sum(exposure.values())
    caps = {k: min(targets.get(k, 0), c.cap_ca) for k, c in claims.items()}
    # Smallest raises first: they fit soonest, and nobody waits for a big one.
    rising = sorted((k for k in claims if targets.get(k, 0) > caps[k]), key=lambda k: targets[k])
    for key in rising:
        granted = min(targets[key], exposure[key] + headroom)
        if granted >= cp.MIN_CURRENT_CA and granted > caps[key]:
            caps[key] = granted
            headroom -= max(0, granted - exposure[key])
    return caps


def allocate(
    claims: Mapping[str, Claim], limit_ca: int, turns: Mapping[str, Turn], now: float
) -> tuple[dict[str, int], dict[str, Turn]]:
    """The caps to set now and the rotation after this step."""
    targets, new_turns = shares(claims, limit_ca, turns, now)
    return grant(claims, targets, limit_ca), new_turns


class SupplyLimit:
    """Keeps the live charge points within one supply."""

    def __init__(self, max_current_a: float) -> None:
        self.limit_ca = round(max_current_a * 100)
        self._turns: dict[str, Turn] = {}
        # Charge points that were balanced before and are gone now (released or forgotten while
        # disconnected): their station may still offer its last PWM until its own safety timeout,
        # so that current stays counted (see cp.exposure_ca) and is not granted to another.
        self._present: dict[str, cp.ChargePoint] = {}
        self._departed: dict[str, cp.ChargePoint] = {}
        self._busy = False
        self._again = False

    def balance(self, points: Iterable[cp.ChargePoint], now: float) -> None:
        """Recompute and apply every charge point's cap (re-entrant calls are folded in)."""
        if self._busy:
            self._again = True  # a cap change made a point report a change: once more after
            return
        self._busy = True
        try:
            points = list(points)
            by_key = {p.identity.serial: p for p in points}
            self._note_departed(by_key, now)
            for _ in range(len(points) + 2):
                self._again = False
                claims = {k: claim(p.state, now) for k, p in by_key.items()}
                for key, gone in self._departed.items():
                    claims[key] = Claim(0, False, 0, cp.exposure_ca(gone.state, now))
                caps, self._turns = allocate(claims, self.limit_ca, self._turns, now)
                for key, point in by_key.items():
                    cap = caps[key]
                    if cap != point.state.supply_cap_ca:
                        point.commit(cp.set_supply_cap(point.state, cap, now))
                if not self._again:
                    break
        finally:
            self._busy = False

    def _note_departed(self, present: dict[str, cp.ChargePoint], now: float) -> None:
        for key, point in self._present.items():
            if key not in present:
                self._departed[key] = point
        self._present = present
        self._departed = {
            key: point
            for key, point in self._departed.items()
            if key not in present and cp.exposure_ca(point.state, now) > 0
        }


def claim(state: cp.State, now: float) -> Claim:
    """What a charge point's state means for the shared supply."""
    return Claim(
        demand_ca=cp.supply_demand_ca(state),
        drawing=cp.drawing(state),
        cap_ca=state.supply_cap_ca or 0,
        exposure_ca=cp.exposure_ca(state, now),
    )
