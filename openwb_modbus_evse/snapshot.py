"""A frozen copy of what the HTTP answers show, taken on the event loop.

/metrics and /api/status are encoded in a worker thread (see interfaces/http/throttle.py); that
thread reads only these immutable objects, never the live charge points the event loop changes.
Taking one copies references (the charge-point states are immutable already) and a few numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import chargepoint as cp
from .view import HeartbeatInfo


@dataclass(frozen=True)
class OcppSnapshot:
    """A station's OCPP connection."""

    ident: str  # its OCPP identity
    url: str
    up: bool  # connected and booted
    reconnects: int
    queued: int  # messages waiting for the central system
    status: str  # the connector's status as sent (or to be sent)
    transaction: str | None  # the central system's transaction id, or the local one


@dataclass(frozen=True)
class PointSnapshot:
    """One charge point (a :class:`~.view.Viewable`)."""

    identity: cp.Identity
    state: cp.State
    energy_wh: float
    max_data_age: float
    implausible_reports: int
    recent_log: tuple[str, ...]
    firmware: int | None  # of the connected station
    heartbeat_age_s: float | None  # of its controller's heartbeat (None: it has none)
    # Power for the page: (unix time of the first value, average W per minute or None).
    history: tuple[float, tuple[int | None, ...]]
    heartbeat: HeartbeatInfo | None = None  # of its controller (None: it runs none)
    last_disconnect: tuple[float, str] | None = None  # when (monotonic) and why
    session_wh: float | None = None  # energy since the vehicle was plugged in
    ocpp: OcppSnapshot | None = None  # its OCPP connection, if it has one
    # Where a peer connects from that claims the station's ID, unconfirmed (identity.py).
    claim: str | None = None


@dataclass(frozen=True)
class HeartbeatSnapshot:
    """One controller heartbeat."""

    controller: str
    scope: str
    age_s: float
    lapsed: bool
    lapses: int
    recoveries: int
    source: str  # where its last request came from ("" if unknown)


@dataclass(frozen=True)
class MqttSnapshot:
    """The broker connection."""

    connected: bool
    received: int
    sent: int
    dropped: int


@dataclass(frozen=True)
class SupplySnapshot:
    """The shared supply's limits, in A per phase (None: not set)."""

    in_use_a: float | None  # the limit the stations share now
    max_current_a: float | None  # supply_max_current
    dimming_a: float | None  # the grid operator's limit (the lowest source's), before the floor
    floor_a: float  # the §14a floor now (4.2 kW per station that wants current)
    sources: tuple[tuple[str, float], ...]  # each dimming source's limit, if it sets one


@dataclass(frozen=True)
class Snapshot:
    """The whole service at one time."""

    now: float  # the service's monotonic clock
    wall: float  # Unix time
    points: tuple[PointSnapshot, ...]  # in LP order
    heartbeats: tuple[HeartbeatSnapshot, ...]
    mqtt: MqttSnapshot | None
    sessions: int  # established station sessions
    connections: tuple[tuple[str, int], ...]  # open connections by listener
    history_interval_s: float  # seconds per history value
    log_lines_left_out: tuple[tuple[str, int], ...]  # by kind (ratelimit.left_out_totals)
    # OCPP messages by (direction "in"/"out", action, result), counted since start
    ocpp_messages: tuple[tuple[str, str, str, int], ...] = ()
    supply: SupplySnapshot | None = None  # None: no shared supply
    supply_limit_a: float | None = None  # supply_max_current (None: no shared supply)
