"""Byte-exact vectors from the protocol page, and fuzzing of every decoder."""

import zlib
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openwb_modbus_evse.evse import protocol as p

SERIAL = "10BA23AB50534D53302E3120FF162332"


def test_handshake_decodes_serial_as_uppercase_hex_and_firmware():
    raw = bytes.fromhex("10ba23ab50534d53302e3120ff162332") + b"\x04"
    hs = p.decode_handshake(raw)
    assert hs == p.Handshake(serial=SERIAL, firmware=4)
    assert p.encode_handshake(SERIAL, 4) == raw


@pytest.mark.parametrize("size", [0, 16, 18])
def test_handshake_of_wrong_size_is_a_protocol_error(size):
    with pytest.raises(p.ProtocolError) as err:
        p.decode_handshake(b"\x00" * size)
    assert err.value.reason == "bad_handshake"


def test_request_frames_are_type_big_endian_length_body():
    assert p.ping() == b"\x01\x00\x00\x00\x00"
    assert p.collect_data() == b"\x03\x00\x00\x00\x00"
    assert p.set_pwm(26) == b"\x04\x00\x00\x00\x01\x1a"
    assert p.set_pwm(100) == b"\x04\x00\x00\x00\x01\x64"
    assert p.set_contactor(True) == b"\x05\x00\x00\x00\x01\x01"
    assert p.set_contactor(False) == b"\x05\x00\x00\x00\x01\x00"


def test_firmware_upload_carries_crc32_then_image():
    image = b"firmware image \x00\xff"
    frame = p.firmware_upload(image)
    length = 4 + len(image)
    assert frame[:5] == b"\x02" + length.to_bytes(4, "big")
    assert frame[5:9] == zlib.crc32(image).to_bytes(4, "big")
    assert frame[9:] == image
    req = p.decode_request(frame[0], frame[5:])
    assert req.type is p.RequestType.FIRMWARE_UPLOAD and req.image == image and req.crc_ok
    broken = p.decode_request(frame[0], frame[5:-1] + b"x")
    assert broken.crc_ok is False


def test_set_pwm_refuses_duty_cycles_above_100():
    with pytest.raises(ValueError):
        p.set_pwm(101)
    with pytest.raises(ValueError):
        p.encode_request(p.Request(p.RequestType.SET_PWM, pwm=101))


@pytest.mark.parametrize(
    "kind", [p.RequestType.SET_PWM, p.RequestType.SET_CONTACTOR, p.RequestType.FIRMWARE_UPLOAD]
)
def test_a_request_without_its_value_cannot_be_encoded(kind):
    with pytest.raises(ValueError):
        p.encode_request(p.Request(kind))


def test_response_frames():
    assert p.pong() == b"\x01\x00\x00\x00\x00"
    assert p.pwm_ack() == b"\x03\x00\x00\x00\x00"
    assert p.contactor_ack() == b"\x04\x00\x00\x00\x00"
    assert p.notify() == b"\x64\x00\x00\x00\x00"


def _fixed_v1() -> bytes:
    def u32(v: int) -> bytes:
        return v.to_bytes(4, "big", signed=v < 0)

    return b"".join(
        [
            bytes([1, 26, 2, 1]),  # contactor on, 26 %, 6 V, 20 A cable
            *(u32(v) for v in (230_100, 229_800, 231_000)),  # mV
            *(u32(v) for v in (15_600, 15_500, 0)),  # mA
            u32(-67),  # RSSI
            u32(123_456),  # uptime ms
        ]
    )


def test_data_response_firmware_below_3_has_36_fixed_bytes_and_log_lines():
    body = _fixed_v1() + b"contactor on\0pwm 26\0"
    assert len(_fixed_v1()) == 36
    data = p.decode_data(body, firmware=2)
    assert data == p.StationData(
        contactor=True,
        pwm=26,
        pilot=p.Pilot.C_6V,
        proximity=p.Proximity.CABLE_20A,
        voltages_mv=(230_100, 229_800, 231_000),
        currents_ma=(15_600, 15_500, 0),
        rssi_dbm=-67,
        uptime_ms=123_456,
        cp_adc=None,
        pp_adc=None,
        log_lines=("contactor on", "pwm 26"),
    )
    assert data.power_w == pytest.approx(230.1 * 15.6 + 229.8 * 15.5)


def test_data_response_firmware_3_adds_the_two_adc_values():
    body = _fixed_v1() + (3021).to_bytes(4, "big") + (1700).to_bytes(4, "big")
    data = p.decode_data(body, firmware=3)
    assert (data.cp_adc, data.pp_adc, data.log_lines) == (3021, 1700, ())
    # The same 44 bytes read as firmware 2 would put the ADC values into the log: shows the split.
    assert p.decode_data(body, firmware=2).cp_adc is None


def test_data_encoding_round_trips_for_both_generations():
    for firmware in (1, 3, 9):
        data = p.StationData(
            contactor=False,
            pwm=100,
            pilot=p.Pilot.B_9V,
            proximity=p.Proximity.NO_CABLE,
            voltages_mv=(1, 2, 3),
            currents_ma=(4, 5, 6),
            rssi_dbm=-90,
            uptime_ms=2**31 - 1,
            cp_adc=7 if firmware >= 3 else None,
            pp_adc=8 if firmware >= 3 else None,
            log_lines=("a", "b c"),
        )
        frame = p.encode_data(data, firmware)
        assert frame[0] == 2
        assert int.from_bytes(frame[1:5], "big") == len(frame) - 5
        assert p.decode_data(frame[5:], firmware) == data


def test_truncated_last_log_line_is_kept():
    assert p.decode_data(_fixed_v1() + b"one\0two", firmware=1).log_lines == ("one", "two")


def test_short_data_body_is_a_protocol_error():
    with pytest.raises(p.ProtocolError) as err:
        p.decode_data(_fixed_v1(), firmware=3)  # firmware 3 needs 44 bytes
    assert err.value.reason == "short_data"


def test_unknown_pilot_and_proximity_codes_decode_to_unknown():
    body = bytes([0, 100, 9, 7]) + _fixed_v1()[4:]
    data = p.decode_data(body, firmware=1)
    assert data.pilot is p.Pilot.UNKNOWN and data.pilot.is_fault
    assert data.proximity is p.Proximity.UNKNOWN and data.proximity.amps is None


def test_calibration_is_offset_slope_divider_in_integers_never_negative():
    cal = p.StationCalibration(
        voltages=(p.Calibration(100, 3, 2), p.IDENTITY, p.IDENTITY),
        currents=(p.IDENTITY, p.Calibration(1000, 1, 1), p.IDENTITY),
    )
    data = p.decode_data(_fixed_v1(), firmware=1, calibration=cal)
    assert data.voltages_mv == ((230_100 - 100) * 3 // 2, 229_800, 231_000)
    assert data.currents_ma == (15_600, 14_500, 0)  # 0 - 1000 clamps at 0
    assert p.Calibration(10, 1, 1).apply(3) == 0


def test_header_limits():
    assert p.decode_header(b"\x02\x00\x00\x01\x00", p.RESPONSE_TYPES) == (2, 256)
    with pytest.raises(p.ProtocolError) as err:
        p.decode_header(b"\x02\x00\x01\x00\x01", p.RESPONSE_TYPES)  # 64 KiB + 1
    assert err.value.reason == "oversize"
    with pytest.raises(p.ProtocolError) as err:
        p.decode_header(b"\x07\x00\x00\x00\x00", p.RESPONSE_TYPES)
    assert err.value.reason == "unknown_frame_type"


def test_bodiless_responses_with_a_body_are_errors():
    assert p.decode_response(100, b"", 3) is p.ResponseType.NOTIFY
    with pytest.raises(p.ProtocolError) as err:
        p.decode_response(3, b"x", 3)
    assert err.value.reason == "bad_body"


@given(st.binary(max_size=200), st.integers(0, 255))
def test_random_bytes_as_data_give_a_value_or_a_protocol_error(body, firmware):
    try:
        data = p.decode_data(body, firmware)
    except p.ProtocolError:
        assert len(body) < p.data_fixed_size(firmware)
        return
    assert isinstance(data, p.StationData)
    assert 0 <= data.pwm <= 255


def _header(frame_type: int, length: int) -> bytes:
    return bytes([frame_type]) + length.to_bytes(4, "big")


def _split(frame: bytes) -> tuple[int, bytes]:
    kind, length = p.decode_header(frame[: p.HEADER_SIZE], p.REQUEST_TYPES | p.RESPONSE_TYPES)
    assert length == len(frame) - p.HEADER_SIZE  # the header announces the body it carries
    return kind, frame[p.HEADER_SIZE :]


# Mostly known frame types and short bodies, where the decoders have most to check.
frame_types = st.one_of(
    st.sampled_from(sorted(p.REQUEST_TYPES | p.RESPONSE_TYPES)), st.integers(0, 255)
)
bodies = st.one_of(st.binary(max_size=3), st.binary(max_size=80))


@given(frame_types, bodies)
def test_random_request_frames_decode_to_what_they_carry_or_a_protocol_error(frame_type, body):
    try:
        request = p.decode_request(frame_type, body)
    except p.ProtocolError as err:
        assert err.reason in ("unknown_frame_type", "bad_body", "short_body")
        return
    assert request.type == frame_type
    if request.type in (p.RequestType.PING, p.RequestType.COLLECT_DATA):
        assert body == b""
    elif request.type is p.RequestType.SET_PWM:
        assert len(body) == 1 and request.pwm == body[0] <= 100
    elif request.type is p.RequestType.SET_CONTACTOR:
        assert len(body) == 1 and request.contactor == (body[0] != 0)
    else:
        assert request.image == body[4:] and len(body) >= 4
        assert request.crc_ok == (int.from_bytes(body[:4], "big") == zlib.crc32(body[4:]))
    # encoding what was decoded gives a frame that decodes to the same request
    kind, again = _split(p.encode_request(request))
    decoded = p.decode_request(kind, again)
    if request.type is p.RequestType.FIRMWARE_UPLOAD:
        assert decoded.image == request.image and decoded.crc_ok
    else:
        assert decoded == request


@given(frame_types, bodies, st.integers(0, 255))
def test_random_response_frames_decode_to_what_they_carry_or_a_protocol_error(
    frame_type, body, firmware
):
    try:
        response = p.decode_response(frame_type, body, firmware)
    except p.ProtocolError as err:
        assert err.reason in ("unknown_frame_type", "bad_body", "short_data")
        return
    if not isinstance(response, p.StationData):
        assert response == frame_type and response is not p.ResponseType.DATA and body == b""
        return
    assert frame_type == p.ResponseType.DATA and len(body) >= p.data_fixed_size(firmware)
    assert response.contactor == (body[0] != 0) and response.pwm == body[1]
    kind, again = _split(p.encode_data(response, firmware))
    decoded = p.decode_response(kind, again, firmware)
    assert replace(decoded, log_lines=()) == replace(response, log_lines=())
    assert len(decoded.log_lines) == len(response.log_lines)


@given(
    st.one_of(
        st.binary(min_size=5, max_size=5), st.builds(_header, frame_types, st.integers(0, 70_000))
    )
)
def test_random_headers_give_a_value_or_a_protocol_error(raw):
    try:
        kind, length = p.decode_header(raw, p.RESPONSE_TYPES)
    except p.ProtocolError:
        assert raw[0] not in p.RESPONSE_TYPES or int.from_bytes(raw[1:], "big") > p.MAX_BODY_SIZE
        return
    assert kind == raw[0] and kind in p.RESPONSE_TYPES
    assert length == int.from_bytes(raw[1:], "big") <= p.MAX_BODY_SIZE


@given(st.sampled_from(sorted(p.REQUEST_TYPES)), st.binary(max_size=300))
def test_header_announces_the_body_length(frame_type, body):
    assert _split(p.encode_frame(frame_type, body)) == (frame_type, body)


@given(st.integers(0, 100), st.booleans(), st.binary(max_size=64))
def test_every_request_round_trips_through_its_header_and_body(pwm, on, image):
    for frame, expected in (
        (p.ping(), p.Request(p.RequestType.PING)),
        (p.collect_data(), p.Request(p.RequestType.COLLECT_DATA)),
        (p.set_pwm(pwm), p.Request(p.RequestType.SET_PWM, pwm=pwm)),
        (p.set_contactor(on), p.Request(p.RequestType.SET_CONTACTOR, contactor=on)),
    ):
        assert p.decode_request(*_split(frame)) == expected
        assert p.encode_request(expected) == frame
    upload = p.decode_request(*_split(p.firmware_upload(image)))
    assert upload.image == image and upload.crc_ok
