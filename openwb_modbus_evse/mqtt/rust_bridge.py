"""The Rust ``dehneevse-mqtt-bridge``'s MQTT messages, as a controller interface ("bridge-mqtt").

Every station is published: ``new_connection`` when it connects, ``notify`` when it notifies,
``response_collect_data`` after every poll. Requests on the subscribe topic are answered from
the live sessions (no second poller). The set requests are not passed to the station raw: they
go through the charge-point state machine, and only for stations whose controller this is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from .. import chargepoint as cp
from ..evse.link import Session, StationListener
from ..evse.protocol import StationData
from . import rust_bridge_messages as m
from .rust_bridge_messages import BadRequest, MessageType, Reason

log = logging.getLogger(__name__)

CONTROLLER = "bridge-mqtt"
# Refused requests are logged one line each up to this many per minute, then counted.
LOG_LINES_PER_MINUTE = 20


class RustBridgeObserver(Protocol):
    """Counts what the interface does (for metrics)."""

    def bridge_request(self, result: str) -> None:
        """A request was carried out (``ok``) or refused (the reason)."""


class _LogLimit:
    """At most ``per_minute`` lines a minute; the rest are summed up in one line afterwards."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self._per_minute, self._clock = per_minute, clock
        self._window_start = clock()
        self._lines = 0
        self._dropped = 0

    def allow(self) -> bool:
        now = self._clock()
        if now - self._window_start >= 60:
            if self._dropped:
                log.warning("%d more refused MQTT requests were not logged", self._dropped)
            self._window_start, self._lines, self._dropped = now, 0, 0
        if self._lines < self._per_minute:
            self._lines += 1
            return True
        self._dropped += 1
        return False


class RustBridgeApi(StationListener):
    """Publishes what the stations do; carries out requests. ``send`` publishes one payload
    on the publish topic without blocking (the connection decides what a full queue drops)."""

    def __init__(
        self,
        *,
        send: Callable[[bytes], None],
        charge_points: Mapping[str, cp.ChargePoint],
        sessions: Mapping[str, Session],
        controls: Callable[[str], bool],
        heartbeat: Callable[[], None],
        clock: Callable[[], float],
        observer: RustBridgeObserver | None = None,
    ) -> None:
        self._send = send
        self._points = charge_points
        self._sessions = sessions
        self._controls = controls
        self._heartbeat = heartbeat
        self._clock = clock
        self._observer = observer
        self._log_limit = _LogLimit(LOG_LINES_PER_MINUTE, clock)

    # --- stations -> subscribers -----------------------------------------------------------

    def connected(self, session: Session) -> None:
        assert session.serial is not None
        self._send(m.new_connection(session.serial, session.firmware))

    def notified(self, session: Session) -> None:
        assert session.serial is not None
        self._send(m.bare(MessageType.NOTIFY, session.serial))

    def polled(self, session: Session, data: StationData) -> None:
        assert session.serial is not None
        self._send(m.collect_data(session.serial, data))

    # --- subscribers -> stations -----------------------------------------------------------

    def handle(self, payload: bytes, *, retained: bool = False) -> None:
        """One message from the subscribe topic: answered once, with a response or an error."""
        try:
            request = m.parse_request(payload)
            if retained:
                # A retained request is replayed on every (re)connect, long after it was meant.
                raise BadRequest(
                    Reason.RETAINED,
                    "retained requests are not carried out; publish requests without retain",
                    client_id=request.client_id,
                    request=request.type.value,
                )
            reply = self._carry_out(request)
        except BadRequest as err:
            if self._log_limit.allow():
                log.warning(
                    "bridge-mqtt: refused %s for %s: %s",
                    err.request or "a message",
                    err.client_id or "no station",
                    err,
                )
            self._count(err.reason.value)
            self._send(m.error(err))
            return
        self._heartbeat()
        self._count("ok")
        self._send(reply)

    def _carry_out(self, request: m.Request) -> bytes:
        serial, kind = request.client_id, request.type

        def refuse(reason: Reason, text: str) -> BadRequest:
            return BadRequest(reason, text, client_id=serial, request=kind.value)

        point = self._points.get(serial)
        if point is None:
            raise refuse(Reason.UNKNOWN_CLIENT_ID, "no station with this client_id is known")
        response = m.RESPONSE_TO[kind]
        if kind in (MessageType.REQUEST_PING, MessageType.REQUEST_DATA_COLLECTION):
            session = self._sessions.get(serial)
            if session is None or session.latest is None:
                raise refuse(Reason.OFFLINE, "the station is not connected")
            if kind is MessageType.REQUEST_PING:
                return m.bare(response, serial)
            # Its log went out with the poll that brought it; this answer does not repeat it.
            return m.collect_data(serial, session.latest, with_log=False)
        if not self._controls(serial):
            raise refuse(
                Reason.NOT_CONTROLLER,
                f"station {point.name} is not controlled by {CONTROLLER} (see its controller)",
            )
        now = self._clock()
        if kind is MessageType.REQUEST_SET_PWM_PERCENT:
            assert request.pwm_percent is not None
            try:
                centiamps = m.pwm_to_centiamps(request.pwm_percent)
                state = cp.set_current(point.state, centiamps, now)
            except (ValueError, cp.Refused) as err:
                raise refuse(Reason.BAD_VALUE, str(err)) from None
        else:
            assert request.contactor_state is not None
            state = cp.set_contactor_allowed(point.state, request.contactor_state, now)
        point.commit(state)
        return m.bare(response, serial)

    def _count(self, result: str) -> None:
        if self._observer is not None:
            self._observer.bridge_request(result)
