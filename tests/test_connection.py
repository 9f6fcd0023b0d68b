"""The I/O-free station connection: both ends, fed bytes the way sockets deliver them."""

from dataclasses import replace

import pytest
from conftest import idle_data
from hypothesis import given
from hypothesis import strategies as st

from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.evse.connection import NEED_DATA, Connection, Notify, Response, Role

SERIAL = "10BA23AB50534D53302E3120FF162332"
PING = p.Request(p.RequestType.PING)
COLLECT = p.Request(p.RequestType.COLLECT_DATA)
PWM_26 = p.Request(p.RequestType.SET_PWM, pwm=26)
CONTACTOR_ON = p.Request(p.RequestType.SET_CONTACTOR, contactor=True)


def events(connection: Connection) -> list:
    """Every event the bytes received so far make."""
    found = []
    while (event := connection.next_event()) is not NEED_DATA:
        found.append(event)
    return found


def service(firmware: int = 4, **options) -> Connection:
    """The service's end, after the station's handshake."""
    connection = Connection(Role.SERVICE, **options)
    connection.receive_data(p.encode_handshake(SERIAL, firmware))
    assert events(connection) == [p.Handshake(SERIAL, firmware)]
    return connection


def station(firmware: int = 4) -> Connection:
    """The station's end, after it sent its handshake."""
    connection = Connection(Role.STATION)
    connection.send(p.Handshake(SERIAL, firmware))
    return connection


def protocol_error(connection: Connection) -> str:
    with pytest.raises(p.ProtocolError) as err:
        connection.next_event()
    return err.value.reason


# --- the service's end ------------------------------------------------------------------------


def test_handshake_fed_byte_by_byte():
    connection = Connection(Role.SERVICE)
    raw = p.encode_handshake(SERIAL, 3)
    for byte in raw[:-1]:
        connection.receive_data(bytes([byte]))
        assert connection.next_event() is NEED_DATA
    connection.receive_data(raw[-1:])
    assert connection.next_event() == p.Handshake(SERIAL, 3)
    assert connection.handshake == p.Handshake(SERIAL, 3)
    assert connection.next_event() is NEED_DATA


def test_data_response_fed_byte_by_byte():
    connection = service()
    connection.send(COLLECT)
    frame = p.encode_data(idle_data(pwm=26), 4)
    for byte in frame[:-1]:
        connection.receive_data(bytes([byte]))
        assert connection.next_event() is NEED_DATA
    connection.receive_data(frame[-1:])
    assert events(connection) == [Response(COLLECT, idle_data(pwm=26))]
    assert connection.waiting == ()


def test_handshake_and_frames_in_one_chunk():
    connection = Connection(Role.SERVICE)
    connection.receive_data(p.encode_handshake(SERIAL, 4) + p.notify())
    assert events(connection) == [p.Handshake(SERIAL, 4), Notify()]


def test_several_responses_in_one_chunk_pair_with_their_requests_in_order():
    connection = service()
    frames = [connection.send(r) for r in (PWM_26, CONTACTOR_ON, COLLECT, PING)]
    assert frames == [p.set_pwm(26), p.set_contactor(True), p.collect_data(), p.ping()]
    assert connection.waiting == (PWM_26, CONTACTOR_ON, COLLECT, PING)
    connection.receive_data(
        p.pwm_ack() + p.contactor_ack() + p.encode_data(idle_data(), 4) + p.pong()
    )
    assert events(connection) == [
        Response(PWM_26),
        Response(CONTACTOR_ON),
        Response(COLLECT, idle_data()),
        Response(PING),
    ]
    assert connection.waiting == ()


def test_notify_between_request_and_response():
    connection = service()
    connection.send(COLLECT)
    connection.receive_data(p.notify() + p.notify())
    assert events(connection) == [Notify(), Notify()]
    assert connection.waiting == (COLLECT,)  # a notify answers nothing
    connection.receive_data(p.encode_data(idle_data(), 4))
    assert events(connection) == [Response(COLLECT, idle_data())]


def test_a_response_with_no_request_waiting_is_a_protocol_error():
    connection = service()
    connection.receive_data(p.pwm_ack())
    assert protocol_error(connection) == "unexpected_response"


def test_events_before_an_error_in_the_same_chunk_come_out_first():
    connection = service()
    connection.send(COLLECT)
    connection.receive_data(p.encode_data(idle_data(), 4) + p.pong())
    assert connection.next_event() == Response(COLLECT, idle_data())
    assert protocol_error(connection) == "unexpected_response"


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (COLLECT, p.pong()),
        (PING, p.encode_data(idle_data(), 4)),
        (PWM_26, p.contactor_ack()),
        (CONTACTOR_ON, p.pwm_ack()),
    ],
)
def test_a_response_of_the_wrong_type_is_a_protocol_error(request_, reply):
    connection = service()
    connection.send(request_)
    connection.receive_data(reply)
    assert protocol_error(connection) == "wrong_response"


def test_a_broken_connection_stays_broken():
    connection = service()
    connection.send(PING)
    connection.receive_data(p.pwm_ack() + p.pong())
    assert protocol_error(connection) == "wrong_response"
    assert protocol_error(connection) == "wrong_response"  # the pong after it is not read


def test_an_oversized_length_fails_on_the_header_before_the_body_arrives():
    connection = service()
    connection.send(COLLECT)
    connection.receive_data(b"\x02\x00\x01\x00")  # a data response, and most of its length
    assert connection.next_event() is NEED_DATA
    connection.receive_data(b"\x01")  # 64 KiB + 1
    assert protocol_error(connection) == "oversize"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (bytes([7, 0, 0, 0, 0]), "unknown_frame_type"),
        (p.encode_frame(p.ResponseType.DATA, b"\x00" * 20), "short_data"),
        (p.encode_frame(p.ResponseType.PWM_ACK, b"x"), "bad_body"),
    ],
)
def test_malformed_frames_are_protocol_errors(reply, reason):
    connection = service()
    connection.send(COLLECT)
    connection.receive_data(reply)
    assert protocol_error(connection) == reason


def test_the_handshake_decides_layout_and_calibration_of_data():
    calibration = p.StationCalibration(currents=(p.Calibration(slope=2),) * 3)
    asked: list[str] = []

    def calibration_for(serial: str) -> p.StationCalibration:
        asked.append(serial)
        return calibration

    connection = service(firmware=2, calibration_for=calibration_for)
    assert asked == [SERIAL]
    connection.send(COLLECT)
    raw = idle_data(currents_ma=(1000, 2000, 0), cp_adc=None, pp_adc=None)
    connection.receive_data(p.encode_data(raw, 2))
    (response,) = events(connection)
    assert response.data == replace(raw, currents_ma=(2000, 4000, 0))


def test_a_firmware_upload_waits_for_no_response():
    connection = service()
    upload = p.Request(p.RequestType.FIRMWARE_UPLOAD, image=b"image")
    assert connection.send(upload) == p.firmware_upload(b"image")
    assert connection.waiting == ()


def test_the_service_sends_requests_only_and_only_after_the_handshake():
    with pytest.raises(ValueError, match="after the station's handshake"):
        Connection(Role.SERVICE).send(PING)
    with pytest.raises(ValueError, match="requests only"):
        service().send(Notify())
    connection = service()
    with pytest.raises(ValueError):
        connection.send(p.Request(p.RequestType.SET_PWM, pwm=101))
    assert connection.waiting == ()  # nothing went out, so nothing is awaited


# --- the station's end ------------------------------------------------------------------------


def test_requests_fed_byte_by_byte_and_several_in_one_chunk():
    connection = station()
    stream = p.set_pwm(26) + p.collect_data() + p.firmware_upload(b"new")
    for byte in stream[:5]:
        connection.receive_data(bytes([byte]))
        assert connection.next_event() is NEED_DATA
    connection.receive_data(stream[5:])
    found = events(connection)
    assert found[:2] == [PWM_26, COLLECT]
    assert found[2].image == b"new" and found[2].crc_ok


def test_the_station_takes_a_whole_firmware_image_but_nothing_larger():
    connection = station()
    connection.receive_data(bytes([2]) + (p.MAX_FIRMWARE_SIZE + 4).to_bytes(4, "big"))
    assert connection.next_event() is NEED_DATA
    connection = station()
    connection.receive_data(bytes([2]) + (p.MAX_FIRMWARE_SIZE + 5).to_bytes(4, "big"))
    assert protocol_error(connection) == "oversize"


def test_a_malformed_request_is_a_protocol_error():
    connection = station()
    connection.receive_data(b"\x04\x00\x00\x00\x01\x65")  # PWM 101 %
    assert protocol_error(connection) == "bad_body"


def test_the_station_sends_its_handshake_first_and_once():
    connection = Connection(Role.STATION)
    with pytest.raises(ValueError, match="handshake first"):
        connection.send(Notify())
    assert connection.send(p.Handshake(SERIAL, 7)) == p.encode_handshake(SERIAL, 7)
    with pytest.raises(ValueError, match="already"):
        connection.send(p.Handshake(SERIAL, 7))


def test_responses_are_encoded_for_the_request_they_answer():
    connection = station(firmware=2)
    assert connection.send(Response(PING)) == p.pong()
    assert connection.send(Response(PWM_26)) == p.pwm_ack()
    assert connection.send(Response(CONTACTOR_ON)) == p.contactor_ack()
    assert connection.send(Notify()) == p.notify()
    data = idle_data(cp_adc=None, pp_adc=None)
    assert connection.send(Response(COLLECT, data)) == p.encode_data(data, 2)


@pytest.mark.parametrize(
    "response",
    [
        Response(COLLECT),  # data missing
        Response(PING, idle_data()),  # data where none belongs
        Response(p.Request(p.RequestType.FIRMWARE_UPLOAD, image=b"x")),  # never answered
        PING,  # a station sends no requests
    ],
)
def test_the_station_refuses_to_send_what_does_not_fit(response):
    with pytest.raises(ValueError):
        station().send(response)


# --- both ends --------------------------------------------------------------------------------

REQUESTS = [PING, COLLECT, PWM_26, CONTACTOR_ON, COLLECT]


@given(st.lists(st.integers(1, 40), max_size=30), st.sampled_from([2, 4]))
def test_both_ends_agree_however_the_bytes_are_cut(cuts, firmware):
    """A conversation between the two ends gives the same events for any cutting of the stream."""
    ours, theirs = Connection(Role.SERVICE), Connection(Role.STATION)
    ours.receive_data(theirs.send(p.Handshake(SERIAL, firmware)))
    assert events(ours) == [p.Handshake(SERIAL, firmware)]
    theirs.receive_data(b"".join(ours.send(r) for r in REQUESTS))
    received = events(theirs)
    assert received == REQUESTS
    data = idle_data(cp_adc=None, pp_adc=None) if firmware < 3 else idle_data()
    replies = [Response(r, data if r == COLLECT else None) for r in received]
    stream = b"".join(theirs.send(r) for r in [Notify(), *replies, Notify()])
    got = []
    for size in [*cuts, len(stream)]:
        piece, stream = stream[:size], stream[size:]
        ours.receive_data(piece)
        got += events(ours)
    assert got == [Notify(), *replies, Notify()]
    assert ours.waiting == ()
