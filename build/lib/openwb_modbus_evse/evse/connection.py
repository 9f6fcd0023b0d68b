"""One station connection without I/O, for either end (the shape of h11).

Bytes read from the socket go in with :meth:`Connection.receive_data`; :meth:`Connection.next_event`
turns them into events, one at a time, or says it needs more data. What an end says goes through
:meth:`Connection.send`, which returns the bytes to write. Whoever owns the socket never sees a
frame header.

The events, and which end sends them:

- :class:`~.protocol.Handshake`: the station, once, before anything else;
- :class:`~.protocol.Request`: the service;
- :class:`Response`: the station, answering a request;
- :class:`Notify`: the station, unsolicited.

The service's end pairs every response with the oldest request still waiting for one (the
station answers in request order) and raises :class:`~.protocol.ProtocolError` for a response
nobody asked for or one of the wrong type. Whatever a peer sends that the protocol does not
allow raises ProtocolError; the connection is broken from then on, as a byte stream cannot be
resynchronised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from . import protocol as p


class Role(Enum):
    """Which end of the connection this is."""

    SERVICE = "service"  # receives the handshake, sends requests
    STATION = "station"  # sends the handshake, answers requests


@dataclass(frozen=True)
class Response:
    """The station's answer to ``request``: ``data`` for a collect-data, None for the others."""

    request: p.Request
    data: p.StationData | None = None


@dataclass(frozen=True)
class Notify:
    """The station's unsolicited "data changed"; it carries nothing."""


Event = p.Handshake | p.Request | Response | Notify


class NeedData(Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = "need data"


#: What :meth:`Connection.next_event` returns until the bytes for a whole event have arrived.
NEED_DATA = NeedData.NEED_DATA


class Connection:
    """The protocol state of one TCP connection between a station and the service."""

    def __init__(
        self,
        role: Role,
        calibration_for: Callable[[str], p.StationCalibration] | None = None,
    ) -> None:
        """``calibration_for`` gives the service's end the calibration of a station's serial."""
        self.role = role
        #: The handshake, once sent (station) or received (service).
        self.handshake: p.Handshake | None = None
        self._calibration_for = calibration_for or (lambda serial: p.NO_CALIBRATION)
        self._calibration = p.NO_CALIBRATION
        self._buffer = bytearray()
        self._waiting: deque[p.Request] = deque()
        self._error: p.ProtocolError | None = None
        if role is Role.SERVICE:
            self._types, self._max_body = p.RESPONSE_TYPES, p.MAX_BODY_SIZE
        else:
            # A firmware upload carries the image and its CRC32.
            self._types, self._max_body = p.REQUEST_TYPES, p.MAX_FIRMWARE_SIZE + 4

    @property
    def waiting(self) -> tuple[p.Request, ...]:
        """Requests sent and not answered yet, oldest first (the service's end)."""
        return tuple(self._waiting)

    # --- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer, in order, in pieces of any size."""
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        """The next event from the bytes received so far, or :data:`NEED_DATA`.

        Raises :class:`~.protocol.ProtocolError` for what the peer may not send, and again on
        every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            if self.role is Role.STATION:
                return self._next_request()
            if self.handshake is None:
                return self._next_handshake()
            return self._next_response()
        except p.ProtocolError as err:
            self._error = err
            raise

    def _next_handshake(self) -> p.Handshake | NeedData:
        if len(self._buffer) < p.HANDSHAKE_SIZE:
            return NEED_DATA
        self.handshake = p.decode_handshake(bytes(self._buffer[: p.HANDSHAKE_SIZE]))
        del self._buffer[: p.HANDSHAKE_SIZE]
        self._calibration = self._calibration_for(self.handshake.serial)
        return self.handshake

    def _next_frame(self) -> tuple[int, bytes] | None:
        if len(self._buffer) < p.HEADER_SIZE:
            return None
        # The header is checked before the body arrives: an oversize announcement fails at once
        # instead of making us buffer what it announces.
        kind, length = p.decode_header(
            bytes(self._buffer[: p.HEADER_SIZE]), self._types, self._max_body
        )
        end = p.HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[p.HEADER_SIZE : end])
        del self._buffer[:end]
        return kind, body

    def _next_request(self) -> p.Request | NeedData:
        frame = self._next_frame()
        return NEED_DATA if frame is None else p.decode_request(*frame)

    def _next_response(self) -> Response | Notify | NeedData:
        frame = self._next_frame()
        if frame is None:
            return NEED_DATA
        kind, body = frame
        assert self.handshake is not None
        decoded = p.decode_response(kind, body, self.handshake.firmware, self._calibration)
        if decoded is p.ResponseType.NOTIFY:
            return Notify()
        if not self._waiting:
            raise p.ProtocolError(
                "unexpected_response", f"frame type {kind} arrived with no request waiting"
            )
        request = self._waiting.popleft()
        expect = p.EXPECTED_RESPONSE[request.type]
        data = decoded if isinstance(decoded, p.StationData) else None
        got = p.ResponseType.DATA if data is not None else decoded
        if got is not expect:
            raise p.ProtocolError(
                "wrong_response", f"expected {expect.name}, got frame type {kind}"
            )
        return Response(request, data)

    # --- sending --------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes that say ``event``; ValueError if this end may not send it now."""
        if self.role is Role.SERVICE:
            return self._send_request(event)
        if isinstance(event, p.Handshake):
            if self.handshake is not None:
                raise ValueError("the handshake was sent already")
            self.handshake = event
            return p.encode_handshake(event.serial, event.firmware)
        if self.handshake is None:
            raise ValueError("the station sends its handshake first")
        if isinstance(event, Notify):
            return p.notify()
        if isinstance(event, Response):
            return self._encode_response(event, self.handshake.firmware)
        raise ValueError(f"a station does not send {event!r}")

    def _send_request(self, event: Event) -> bytes:
        if not isinstance(event, p.Request):
            raise ValueError(f"the service sends requests only, not {event!r}")
        if self.handshake is None:
            raise ValueError("the service speaks after the station's handshake")
        frame = p.encode_request(event)
        if event.type in p.EXPECTED_RESPONSE:  # a firmware upload is never answered
            self._waiting.append(event)
        return frame

    @staticmethod
    def _encode_response(response: Response, firmware: int) -> bytes:
        kind = p.EXPECTED_RESPONSE.get(response.request.type)
        if kind is None:
            raise ValueError(f"{response.request.type.name} is never answered")
        if response.data is not None:
            if kind is not p.ResponseType.DATA:
                raise ValueError(f"data does not answer {response.request.type.name}")
            return p.encode_data(response.data, firmware)
        if kind is p.ResponseType.DATA:
            raise ValueError("a collect-data is answered with data")
        return p.encode_frame(kind)
