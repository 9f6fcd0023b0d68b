"""The Dehne-EVSE wire protocol: handshake, frames, requests and responses.

Pure encoding and decoding, no I/O. All integers on the wire are big-endian. Every decoder
either returns a value or raises :class:`ProtocolError`; nothing else escapes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

import bitstring

# The station drops a connection after this long without a request, and switches itself off
# (contactor open, PWM 100 %) after the longer one.
STATION_IDLE_TIMEOUT = 10.0
STATION_SAFETY_TIMEOUT = 300.0

HANDSHAKE_SIZE = 17
HEADER_SIZE = 5
# The station keeps at most 1 KiB of log per data response; anything near this limit is garbage,
# and refusing it keeps one broken peer from making us buffer megabytes.
MAX_BODY_SIZE = 64 * 1024
# The largest firmware image a station takes: 1 MiB, the application slot of the common ESP32
# "two OTA slots" flash layout (ESP-IDF's partitions_two_ota on 4 MB flash).
MAX_FIRMWARE_SIZE = 1024 * 1024

_HEADER_FMT = "uint8, uintbe32"
_DATA_FMT_V1 = "uint8, uint8, uint8, uint8, 6*uintbe32, intbe32, intbe32"
_DATA_FMT_V3 = _DATA_FMT_V1 + ", uintbe32, uintbe32"
DATA_FIXED_SIZE_V1 = 36
DATA_FIXED_SIZE_V3 = 44
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


class ProtocolError(Exception):
    """A peer sent something the protocol does not allow.

    ``reason`` is a short stable slug (used as a metric label); the message says what was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestType(IntEnum):
    """Frame types sent by the server."""

    PING = 1
    FIRMWARE_UPLOAD = 2
    COLLECT_DATA = 3
    SET_PWM = 4
    SET_CONTACTOR = 5


class ResponseType(IntEnum):
    """Frame types sent by the station."""

    PONG = 1
    DATA = 2
    PWM_ACK = 3
    CONTACTOR_ACK = 4
    NOTIFY = 100


#: The response each request is answered with (firmware upload is never answered).
EXPECTED_RESPONSE: dict[RequestType, ResponseType] = {
    RequestType.PING: ResponseType.PONG,
    RequestType.COLLECT_DATA: ResponseType.DATA,
    RequestType.SET_PWM: ResponseType.PWM_ACK,
    RequestType.SET_CONTACTOR: ResponseType.CONTACTOR_ACK,
}


class Pilot(IntEnum):
    """Control-pilot voltage as the station measures it (IEC 61851 state in the name)."""

    A_12V = 0
    B_9V = 1
    C_6V = 2
    D_3V = 3
    FAULT = 4
    MINUS_12V = 5
    UNKNOWN = 255  # a code this codec does not know; treated like a fault

    @property
    def plugged(self) -> bool:
        """A vehicle is connected (9, 6 or 3 V)."""
        return self in (Pilot.B_9V, Pilot.C_6V, Pilot.D_3V)

    @property
    def requests_power(self) -> bool:
        """The vehicle asks for power (6 or 3 V)."""
        return self in (Pilot.C_6V, Pilot.D_3V)

    @property
    def is_fault(self) -> bool:
        """Error states: 0 V, -12 V or an unknown code."""
        return self in (Pilot.FAULT, Pilot.MINUS_12V, Pilot.UNKNOWN)

    @property
    def state(self) -> str:
        """IEC 61851 state letter ("unknown" for a code this codec does not know)."""
        return {0: "A", 1: "B", 2: "C", 3: "D", 4: "E", 5: "F"}.get(int(self), "unknown")


class Proximity(IntEnum):
    """Proximity-pilot reading: the current rating of the inserted cable."""

    CABLE_13A = 0
    CABLE_20A = 1
    CABLE_32A = 2
    NO_CABLE = 3
    UNKNOWN = 255

    @property
    def amps(self) -> int | None:
        """Cable rating in A; None without a (known) cable."""
        return {0: 13, 1: 20, 2: 32}.get(int(self))


_E = TypeVar("_E", Pilot, Proximity)


def _enum_or_unknown(enum: type[_E], code: int) -> _E:
    try:
        return enum(code)
    except ValueError:
        return enum.UNKNOWN  # type: ignore[return-value]


@dataclass(frozen=True)
class Calibration:
    """Converts one raw V/I value: ``max(0, (raw - offset) * slope // divider)``."""

    offset: int = 0
    slope: int = 1
    divider: int = 1

    def apply(self, raw: int) -> int:
        """Calibrated value of ``raw`` (integer arithmetic, never negative)."""
        return max(0, (raw - self.offset) * self.slope // self.divider)


IDENTITY = Calibration()


@dataclass(frozen=True)
class StationCalibration:
    """Calibration of the six measured values, phase voltages then phase currents."""

    voltages: tuple[Calibration, Calibration, Calibration] = (IDENTITY, IDENTITY, IDENTITY)
    currents: tuple[Calibration, Calibration, Calibration] = (IDENTITY, IDENTITY, IDENTITY)


NO_CALIBRATION = StationCalibration()


@dataclass(frozen=True)
class Handshake:
    """What a station sends right after connecting."""

    serial: str  # 32 uppercase hex digits
    firmware: int


@dataclass(frozen=True)
class Target:
    """What a station should report: PWM duty cycle and contactor (what the link sends until
    the station reports it)."""

    pwm: int
    contactor: bool


@dataclass(frozen=True)
class StationData:
    """One data response: the station's state and measurements (calibrated)."""

    contactor: bool
    pwm: int
    pilot: Pilot
    proximity: Proximity
    voltages_mv: tuple[int, int, int]
    currents_ma: tuple[int, int, int]
    rssi_dbm: int
    uptime_ms: int
    cp_adc: int | None = None  # firmware >= 3 only
    pp_adc: int | None = None
    log_lines: tuple[str, ...] = field(default=())

    @property
    def power_w(self) -> float:
        """Sum of V*I over the phases (the station measures no power factor)."""
        return sum(self.phase_powers_w)

    @property
    def phase_powers_w(self) -> tuple[float, float, float]:
        """V*I per phase in W."""
        v, i = self.voltages_mv, self.currents_ma
        return (v[0] * i[0] / 1e6, v[1] * i[1] / 1e6, v[2] * i[2] / 1e6)


# --- handshake and framing -------------------------------------------------------------------


def encode_handshake(serial: str, firmware: int) -> bytes:
    """The 17 handshake bytes of a station (used by the virtual station)."""
    raw = bytes.fromhex(serial)
    if len(raw) != 16:
        raise ValueError(f"serial must be 32 hex digits, got {serial!r}")
    if not 0 <= firmware <= 255:
        raise ValueError(f"firmware version must fit one byte, got {firmware}")
    return raw + bytes([firmware])


def decode_handshake(raw: bytes) -> Handshake:
    """Serial (as 32 uppercase hex digits) and firmware version from the 17 handshake bytes."""
    if len(raw) != HANDSHAKE_SIZE:
        raise ProtocolError("bad_handshake", f"handshake is {len(raw)} bytes, expected 17")
    return Handshake(serial=raw[:16].hex().upper(), firmware=raw[16])


def encode_frame(frame_type: int, body: bytes = b"") -> bytes:
    """Type byte, big-endian uint32 length, body."""
    return bitstring.pack(_HEADER_FMT, frame_type, len(body)).tobytes() + body


def decode_header(
    raw: bytes, known_types: frozenset[int], max_size: int = MAX_BODY_SIZE
) -> tuple[int, int]:
    """(type, body length) of a 5-byte frame header; rejects unknown types and oversize bodies."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError("short_header", f"frame header is {len(raw)} bytes, expected 5")
    frame_type, length = bitstring.Bits(raw).unpack(_HEADER_FMT)
    if frame_type not in known_types:
        raise ProtocolError("unknown_frame_type", f"unknown frame type {frame_type}")
    if length > max_size:
        raise ProtocolError(
            "oversize", f"frame type {frame_type} announces {length} bytes (limit {max_size})"
        )
    return frame_type, length


RESPONSE_TYPES = frozenset(int(t) for t in ResponseType)
REQUEST_TYPES = frozenset(int(t) for t in RequestType)


# --- requests (server -> station) -----------------------------------------------------------


def ping() -> bytes:
    """Ping request frame."""
    return encode_frame(RequestType.PING)


def collect_data() -> bytes:
    """Collect-data request frame."""
    return encode_frame(RequestType.COLLECT_DATA)


def set_pwm(percent: int) -> bytes:
    """Set-PWM request frame (duty cycle 0..100 %)."""
    if not 0 <= percent <= 100:
        raise ValueError(f"PWM duty cycle must be 0..100 %, got {percent}")
    return encode_frame(RequestType.SET_PWM, bytes([percent]))


def set_contactor(on: bool) -> bytes:
    """Set-contactor request frame."""
    return encode_frame(RequestType.SET_CONTACTOR, b"\x01" if on else b"\x00")


def firmware_upload(image: bytes) -> bytes:
    """Firmware-upload request frame: CRC32 of the image, then the image."""
    crc = bitstring.pack("uintbe32", zlib.crc32(image)).tobytes()
    return encode_frame(RequestType.FIRMWARE_UPLOAD, crc + image)


@dataclass(frozen=True)
class Request:
    """A decoded request, as the station sees it."""

    type: RequestType
    pwm: int | None = None
    contactor: bool | None = None
    image: bytes | None = None
    crc_ok: bool | None = None


def encode_request(request: Request) -> bytes:
    """The frame of a request (what :func:`decode_request` reads back)."""
    kind = request.type
    if kind is RequestType.SET_PWM:
        if request.pwm is None:
            raise ValueError("a set-PWM request needs a duty cycle")
        return set_pwm(request.pwm)
    if kind is RequestType.SET_CONTACTOR:
        if request.contactor is None:
            raise ValueError("a set-contactor request needs on or off")
        return set_contactor(request.contactor)
    if kind is RequestType.FIRMWARE_UPLOAD:
        if request.image is None:
            raise ValueError("a firmware upload needs an image")
        return firmware_upload(request.image)
    return encode_frame(kind)


def decode_request(frame_type: int, body: bytes) -> Request:
    """Decode a request frame body (the station side of the protocol)."""
    if frame_type not in REQUEST_TYPES:
        raise ProtocolError("unknown_frame_type", f"unknown request type {frame_type}")
    kind = RequestType(frame_type)
    if kind in (RequestType.PING, RequestType.COLLECT_DATA):
        if body:
            raise ProtocolError("bad_body", f"{kind.name} carries {len(body)} unexpected bytes")
        return Request(kind)
    if kind in (RequestType.SET_PWM, RequestType.SET_CONTACTOR):
        if len(body) != 1:
            raise ProtocolError("bad_body", f"{kind.name} body is {len(body)} bytes, expected 1")
        if kind is RequestType.SET_PWM:
            if body[0] > 100:
                raise ProtocolError("bad_body", f"PWM duty cycle {body[0]} % is above 100")
            return Request(kind, pwm=body[0])
        return Request(kind, contactor=body[0] != 0)
    if len(body) < 4:
        raise ProtocolError("short_body", "firmware upload without CRC32")
    (crc,) = bitstring.Bits(body[:4]).unpack("uintbe32")
    image = body[4:]
    return Request(kind, image=image, crc_ok=zlib.crc32(image) == crc)


# --- responses (station -> server) ----------------------------------------------------------


def pong() -> bytes:
    """Pong response frame."""
    return encode_frame(ResponseType.PONG)


def pwm_ack() -> bytes:
    """PWM-set acknowledgement frame."""
    return encode_frame(ResponseType.PWM_ACK)


def contactor_ack() -> bytes:
    """Contactor-set acknowledgement frame."""
    return encode_frame(ResponseType.CONTACTOR_ACK)


def notify() -> bytes:
    """Unsolicited "data changed" frame."""
    return encode_frame(ResponseType.NOTIFY)


def data_fixed_size(firmware: int) -> int:
    """Size of the fixed part of a data response for this firmware version."""
    return DATA_FIXED_SIZE_V3 if firmware >= 3 else DATA_FIXED_SIZE_V1


def encode_data(data: StationData, firmware: int) -> bytes:
    """Data-response frame as a station with this firmware sends it (values taken as raw)."""
    values = [
        int(data.contactor),
        data.pwm,
        int(data.pilot),
        int(data.proximity),
        *data.voltages_mv,
        *data.currents_ma,
        data.rssi_dbm,
        data.uptime_ms,
    ]
    fmt = _DATA_FMT_V1
    if firmware >= 3:
        values += [data.cp_adc or 0, data.pp_adc or 0]
        fmt = _DATA_FMT_V3
    logs = b"".join(line.encode("ascii", "replace") + b"\0" for line in data.log_lines)
    return encode_frame(ResponseType.DATA, bitstring.pack(fmt, *values).tobytes() + logs)


def decode_data(
    body: bytes, firmware: int, calibration: StationCalibration = NO_CALIBRATION
) -> StationData:
    """Decode a data-response body; the six V/I values go through ``calibration``."""
    size = data_fixed_size(firmware)
    if len(body) < size:
        raise ProtocolError(
            "short_data",
            f"data body is {len(body)} bytes, firmware {firmware} sends at least {size}",
        )
    fmt = _DATA_FMT_V3 if firmware >= 3 else _DATA_FMT_V1
    values = bitstring.Bits(body[:size]).unpack(fmt)
    contactor, pwm, pilot, proximity = values[:4]
    volts = tuple(c.apply(raw) for c, raw in zip(calibration.voltages, values[4:7], strict=True))
    amps = tuple(c.apply(raw) for c, raw in zip(calibration.currents, values[7:10], strict=True))
    rssi, uptime = values[10], values[11]
    cp_adc, pp_adc = (values[12], values[13]) if firmware >= 3 else (None, None)
    return StationData(
        contactor=contactor != 0,  # 1 means closed; any other non-zero too: the safe assumption
        pwm=pwm,
        pilot=_enum_or_unknown(Pilot, pilot),
        proximity=_enum_or_unknown(Proximity, proximity),
        voltages_mv=volts,  # type: ignore[arg-type]
        currents_ma=amps,  # type: ignore[arg-type]
        rssi_dbm=rssi,
        uptime_ms=uptime,
        cp_adc=cp_adc,
        pp_adc=pp_adc,
        log_lines=_decode_log(body[size:]),
    )


def _decode_log(raw: bytes) -> tuple[str, ...]:
    # Lines end with NUL; a last line without one (a truncated buffer) is still worth showing.
    return tuple(
        part.decode("ascii", "replace") for part in raw.split(b"\0") if part.strip(b"\r\n ")
    )


def decode_response(
    frame_type: int, body: bytes, firmware: int, calibration: StationCalibration = NO_CALIBRATION
) -> StationData | ResponseType:
    """Decode a station frame: the data of a data response, else the (bodiless) frame type."""
    if frame_type not in RESPONSE_TYPES:
        raise ProtocolError("unknown_frame_type", f"unknown frame type {frame_type}")
    kind = ResponseType(frame_type)
    if kind is ResponseType.DATA:
        return decode_data(body, firmware, calibration)
    if body:
        raise ProtocolError("bad_body", f"{kind.name} carries {len(body)} unexpected bytes")
    return kind
