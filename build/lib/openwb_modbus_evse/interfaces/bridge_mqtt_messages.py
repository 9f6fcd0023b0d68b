"""The JSON messages of the Rust ``dehneevse-mqtt-bridge``: encoding, decoding, validation.

Pure, no I/O. Shapes follow that bridge byte for byte: compact JSON (serde_json's
``to_string``), fields in its order (``message_type``, ``client_id``, ``handshake``,
``pwm_percent``, ``contactor_state``, ``measurements``), absent fields left out. Only ``error``
is new: the Rust bridge answered nothing to a bad request, this service answers once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..chargepoint import CA_PER_PWM_PERCENT, MAX_CURRENT_CA, MIN_CHARGING_PWM, PWM_OFF
from ..evse.protocol import UINT32_MAX, Pilot, Proximity, StationData

# A request is well under 200 bytes; anything much larger is not one, and is not parsed.
MAX_REQUEST_BYTES = 4096
# Highest PWM that offers a current by amps = percent * 0.6 (IEC 61851-1: 51 A).
MAX_CURRENT_PWM = 85
_ECHO_CHARS = 64  # how much of an unknown client_id an error message repeats


class MessageType(StrEnum):
    """``message_type`` values; the Rust bridge's, plus ``error``."""

    NEW_CONNECTION = "new_connection"
    NOTIFY = "notify"
    RESPONSE_PING = "response_ping"
    RESPONSE_COLLECT_DATA = "response_collect_data"
    RESPONSE_SET_PWM_PERCENT = "response_set_pwm_percent"
    RESPONSE_SET_CONTACTOR_STATE = "response_set_contactor_state"
    REQUEST_PING = "request_ping"
    REQUEST_DATA_COLLECTION = "request_data_collection"
    REQUEST_SET_PWM_PERCENT = "request_set_pwm_percent"
    REQUEST_SET_CONTACTOR_STATE = "request_set_contactor_state"
    ERROR = "error"


#: The requests this service carries out, and the response each one gets.
RESPONSE_TO: dict[MessageType, MessageType] = {
    MessageType.REQUEST_PING: MessageType.RESPONSE_PING,
    MessageType.REQUEST_DATA_COLLECTION: MessageType.RESPONSE_COLLECT_DATA,
    MessageType.REQUEST_SET_PWM_PERCENT: MessageType.RESPONSE_SET_PWM_PERCENT,
    MessageType.REQUEST_SET_CONTACTOR_STATE: MessageType.RESPONSE_SET_CONTACTOR_STATE,
}

# The Rust bridge's serde enums know five pilot and four proximity values (it panics on any
# other code). -12 V and unknown codes are faults here too, and an unknown cable rating offers
# nothing, like no cable: so they map onto those values and strict consumers keep parsing.
PILOT_VOLTAGE: dict[Pilot, str] = {
    Pilot.A_12V: "volt_12",
    Pilot.B_9V: "volt_9",
    Pilot.C_6V: "volt_6",
    Pilot.D_3V: "volt_3",
    Pilot.FAULT: "fault",
    Pilot.MINUS_12V: "fault",
    Pilot.UNKNOWN: "fault",
}
PROXIMITY_PILOT_AMPS: dict[Proximity, str] = {
    Proximity.CABLE_13A: "amp_13",
    Proximity.CABLE_20A: "amp_20",
    Proximity.CABLE_32A: "amp_32",
    Proximity.NO_CABLE: "no_cable",
    Proximity.UNKNOWN: "no_cable",
}


class Reason(StrEnum):
    """Why a request was refused (the ``reason`` of an error message)."""

    MALFORMED_JSON = "malformed_json"
    WRONG_FIELD_TYPE = "wrong_field_type"
    UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
    UNKNOWN_CLIENT_ID = "unknown_client_id"
    BAD_VALUE = "bad_value"
    NOT_CONTROLLER = "not_controller"
    OFFLINE = "offline"
    BUSY = "busy"
    REPLAY = "replay"  # a retained request: replayed by the broker, not sent now


class BadRequest(Exception):
    """A request that is refused; nothing was changed. Carries what the error message says."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        client_id: str | None = None,
        request: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.client_id = client_id
        self.request = request


@dataclass(frozen=True)
class Request:
    """A well-formed request; the field its type needs is set, the others are None."""

    type: MessageType
    client_id: str
    pwm_percent: int | None = None
    contactor_state: bool | None = None


# --- encoding (service -> subscribers) ---------------------------------------------------------


def _dump(message: dict[str, Any]) -> bytes:
    # serde_json::to_string: no whitespace, non-ASCII as UTF-8, control characters escaped.
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def new_connection(client_id: str, firmware_version: int) -> bytes:
    """A station connected (sent once it has proved to be one)."""
    return _dump(
        {
            "message_type": MessageType.NEW_CONNECTION.value,
            "client_id": client_id,
            "handshake": {"firmware_version": firmware_version},
        }
    )


def bare(message_type: MessageType, client_id: str) -> bytes:
    """A message with no fields but its type and station: notify and the plain responses."""
    return _dump({"message_type": message_type.value, "client_id": client_id})


def _u32(value: int) -> int:
    return min(max(value, 0), UINT32_MAX)


def collect_data(client_id: str, data: StationData, *, with_log: bool = True) -> bytes:
    """``response_collect_data`` for one data report of the station.

    ``logging_buffer`` holds the station's log lines, each NUL-terminated as in its buffer (which
    the Rust bridge passed on); ``with_log=False`` leaves it empty, for data whose log was
    already published.
    Firmware before 3 reports no ADC values: they read 0.
    """
    volts, amps = data.voltages_mv, data.currents_ma
    log = "".join(line + "\0" for line in data.log_lines) if with_log else ""
    return _dump(
        {
            "message_type": MessageType.RESPONSE_COLLECT_DATA.value,
            "client_id": client_id,
            "pwm_percent": data.pwm,
            "contactor_state": data.contactor,
            "measurements": {
                "pilot_voltage": PILOT_VOLTAGE[data.pilot],
                "proximity_pilot_amps": PROXIMITY_PILOT_AMPS[data.proximity],
                "phase1_millivolts": _u32(volts[0]),
                "phase2_millivolts": _u32(volts[1]),
                "phase3_millivolts": _u32(volts[2]),
                "phase1_milliamps": _u32(amps[0]),
                "phase2_milliamps": _u32(amps[1]),
                "phase3_milliamps": _u32(amps[2]),
                "wifi_rssi": data.rssi_dbm,
                "uptime_milliseconds": data.uptime_ms,
                "current_control_pilot_adc": _u32(data.cp_adc or 0),
                "current_proximity_pilot_adc": _u32(data.pp_adc or 0),
                "logging_buffer": log,
            },
        }
    )


def error(err: BadRequest) -> bytes:
    """The one answer to a refused request: what was refused, a reason slug and a sentence."""
    message: dict[str, Any] = {"message_type": MessageType.ERROR.value}
    if err.client_id is not None:
        message["client_id"] = err.client_id[:_ECHO_CHARS]
    if err.request is not None:
        message["request"] = err.request[:_ECHO_CHARS]
    message["reason"] = err.reason.value
    message["error"] = str(err)
    return _dump(message)


# --- decoding (subscribers -> service) ---------------------------------------------------------


def parse_request(payload: bytes) -> Request:
    """Decode and check one message from the subscribe topic; raises :class:`BadRequest`.

    Fields other than the ones the request type needs are ignored, as serde does; a field the
    type needs must be there with the right JSON type (``pwm_percent`` an integer,
    ``contactor_state`` true or false).
    """
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadRequest(
            Reason.MALFORMED_JSON, f"message is {len(payload)} bytes, limit {MAX_REQUEST_BYTES}"
        )
    try:
        message = json.loads(payload.decode("utf-8"))
    except ValueError as err:  # not UTF-8, not JSON, or a number of 4300+ digits
        raise BadRequest(Reason.MALFORMED_JSON, f"not JSON: {err}") from None
    except RecursionError:
        raise BadRequest(Reason.MALFORMED_JSON, "not JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise BadRequest(Reason.MALFORMED_JSON, "not a JSON object")
    kind, client_id = message.get("message_type"), message.get("client_id")
    echo_id = client_id if isinstance(client_id, str) else None
    echo_kind = kind if isinstance(kind, str) else None

    def bad(reason: Reason, text: str) -> BadRequest:
        return BadRequest(reason, text, client_id=echo_id, request=echo_kind)

    if not isinstance(kind, str):
        raise bad(Reason.WRONG_FIELD_TYPE, f"message_type must be a string, got {_show(kind)}")
    if not isinstance(client_id, str):
        raise bad(Reason.WRONG_FIELD_TYPE, f"client_id must be a string, got {_show(client_id)}")
    try:
        request_type = MessageType(kind)
    except ValueError:
        request_type = None
    if request_type not in RESPONSE_TO:
        accepted = ", ".join(RESPONSE_TO)
        raise bad(
            Reason.UNKNOWN_MESSAGE_TYPE,
            f"message_type {kind[:_ECHO_CHARS]!r} is not one of {accepted}",
        )
    if request_type is MessageType.REQUEST_SET_PWM_PERCENT:
        percent = message.get("pwm_percent")
        if isinstance(percent, bool) or not isinstance(percent, int):
            raise bad(
                Reason.WRONG_FIELD_TYPE, f"pwm_percent must be an integer, got {_show(percent)}"
            )
        return Request(request_type, client_id, pwm_percent=percent)
    if request_type is MessageType.REQUEST_SET_CONTACTOR_STATE:
        state = message.get("contactor_state")
        if not isinstance(state, bool):
            raise bad(
                Reason.WRONG_FIELD_TYPE,
                f"contactor_state must be true or false, got {_show(state)}",
            )
        return Request(request_type, client_id, contactor_state=state)
    return Request(request_type, client_id)


def _show(value: Any) -> str:
    return "nothing" if value is None else json.dumps(value)[:_ECHO_CHARS]


def pwm_to_centiamps(percent: int) -> int:
    """The current a PWM request asks for: 100 % stops (0), 10..85 % is percent * 0.6 A.

    Capped at the highest current a charge point takes (32 A); cable and station limits apply
    later, as for every controller. Other duty cycles are not a current and raise ValueError.
    """
    if percent == PWM_OFF:
        return 0
    if not MIN_CHARGING_PWM <= percent <= MAX_CURRENT_PWM:
        raise ValueError(
            f"pwm_percent must be {MIN_CHARGING_PWM}..{MAX_CURRENT_PWM} (a current of "
            f"percent * 0.6 A) or {PWM_OFF} (stop), got {percent}"
        )
    return min(percent * CA_PER_PWM_PERCENT, MAX_CURRENT_CA)
