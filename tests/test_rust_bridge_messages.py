"""The Rust bridge's JSON messages: the README's examples, byte for byte, and every bad request."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openwb_modbus_evse.chargepoint import RefusalKind
from openwb_modbus_evse.evse.protocol import Pilot, Proximity, StationData
from openwb_modbus_evse.interfaces import bridge_mqtt_messages as m

SERIAL = "10BA23AB50534D53302E3120FF162332"

# The examples of the dehneevse-mqtt-bridge README, as printed there.
README_NEW_CONNECTION = """{
  "message_type": "new_connection",
  "client_id": "10BA23AB50534D53302E3120FF162332",
  "handshake": {
    "firmware_version": 4
  }
}"""
README_NOTIFY = """{
  "message_type": "notify",
  "client_id": "10BA23AB50534D53302E3120FF162332"
}"""
README_COLLECT_DATA = """{
  "message_type": "response_collect_data",
  "client_id": "10BA23AB50534D53302E3120FF162332",
  "pwm_percent": 0,
  "contactor_state": false,
  "measurements": {
    "pilot_voltage": "volt_12",
    "proximity_pilot_amps": "no_cable",
    "phase1_millivolts": 0,
    "phase2_millivolts": 0,
    "phase3_millivolts": 0,
    "phase1_milliamps": 0,
    "phase2_milliamps": 0,
    "phase3_milliamps": 0,
    "wifi_rssi": -77,
    "uptime_milliseconds": 42,
    "current_control_pilot_adc": 0,
    "current_proximity_pilot_adc": 0,
    "logging_buffer": ""
  }
}"""
README_REQUESTS = {
    "request_ping": """{
  "message_type": "request_ping",
  "client_id": "10BA23AB50534D53302E3120FF162332"
}""",
    "request_data_collection": """{
  "message_type": "request_data_collection",
  "client_id": "10BA23AB50534D53302E3120FF162332"
}""",
    "request_set_contactor_state": """{
  "message_type": "request_set_contactor_state",
  "client_id": "10BA23AB50534D53302E3120FF162332",
  "contactor_state": true
}""",
    "request_set_pwm_percent": """{
  "message_type": "request_set_pwm_percent",
  "client_id": "10BA23AB50534D53302E3120FF162332",
  "pwm_percent": 50
}""",
}


def compact(text: str) -> bytes:
    """What serde_json::to_string prints for the README's pretty-printed example."""
    return json.dumps(json.loads(text), separators=(",", ":")).encode()


def readme_data(**changes) -> StationData:
    values = dict(
        contactor=False,
        pwm=0,
        pilot=Pilot.A_12V,
        proximity=Proximity.NO_CABLE,
        voltages_mv=(0, 0, 0),
        currents_ma=(0, 0, 0),
        rssi_dbm=-77,
        uptime_ms=42,
        cp_adc=0,
        pp_adc=0,
    )
    values.update(changes)
    return StationData(**values)


# --- published messages ------------------------------------------------------------------------


def test_new_connection_is_the_readme_example_byte_for_byte():
    assert m.new_connection(SERIAL, 4) == compact(README_NEW_CONNECTION)


def test_notify_is_the_readme_example_byte_for_byte():
    assert m.bare(m.MessageType.NOTIFY, SERIAL) == compact(README_NOTIFY)


def test_collect_data_is_the_readme_example_byte_for_byte():
    assert m.collect_data(SERIAL, readme_data()) == compact(README_COLLECT_DATA)


@pytest.mark.parametrize(
    "kind",
    ["response_ping", "response_set_contactor_state", "response_set_pwm_percent"],
)
def test_plain_responses_have_type_and_client_id_only(kind):
    raw = m.bare(m.MessageType(kind), SERIAL)
    assert raw == b'{"message_type":"%s","client_id":"%s"}' % (kind.encode(), SERIAL.encode())


@pytest.mark.parametrize(
    ("pilot", "spelling"),
    [
        (Pilot.A_12V, "volt_12"),
        (Pilot.B_9V, "volt_9"),
        (Pilot.C_6V, "volt_6"),
        (Pilot.D_3V, "volt_3"),
        (Pilot.FAULT, "fault"),
        (Pilot.MINUS_12V, "fault"),
        (Pilot.UNKNOWN, "fault"),
    ],
)
def test_pilot_spellings(pilot, spelling):
    message = json.loads(m.collect_data(SERIAL, readme_data(pilot=pilot)))
    assert message["measurements"]["pilot_voltage"] == spelling


@pytest.mark.parametrize(
    ("proximity", "spelling"),
    [
        (Proximity.CABLE_13A, "amp_13"),
        (Proximity.CABLE_20A, "amp_20"),
        (Proximity.CABLE_32A, "amp_32"),
        (Proximity.NO_CABLE, "no_cable"),
        (Proximity.UNKNOWN, "no_cable"),
    ],
)
def test_proximity_spellings(proximity, spelling):
    message = json.loads(m.collect_data(SERIAL, readme_data(proximity=proximity)))
    assert message["measurements"]["proximity_pilot_amps"] == spelling


def test_logging_buffer_is_the_raw_nul_terminated_buffer_unless_left_out():
    data = readme_data(log_lines=("pwm 26%", "contactor on"))
    raw = m.collect_data(SERIAL, data)
    assert b'"logging_buffer":"pwm 26%\\u0000contactor on\\u0000"' in raw
    assert (
        json.loads(m.collect_data(SERIAL, data, with_log=False))["measurements"]["logging_buffer"]
        == ""
    )


def test_firmware_before_3_reports_adc_values_as_0():
    message = json.loads(m.collect_data(SERIAL, readme_data(cp_adc=None, pp_adc=None)))
    assert message["measurements"]["current_control_pilot_adc"] == 0
    assert message["measurements"]["current_proximity_pilot_adc"] == 0


U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)


@given(
    contactor=st.booleans(),
    pwm=st.integers(0, 255),
    pilot=st.sampled_from(Pilot),
    proximity=st.sampled_from(Proximity),
    volts=st.tuples(st.integers(0, 2**40), U32, U32),
    amps=st.tuples(U32, U32, st.integers(0, 2**40)),
    rssi=I32,
    uptime=I32,
    adc=st.one_of(st.none(), U32),
    log=st.lists(st.text(st.characters(codec="ascii", exclude_characters="\0"), max_size=20)),
)
def test_every_report_has_the_documented_fields_and_types(
    contactor, pwm, pilot, proximity, volts, amps, rssi, uptime, adc, log
):
    data = StationData(contactor, pwm, pilot, proximity, volts, amps, rssi, uptime, adc, adc)
    data = StationData(**{**data.__dict__, "log_lines": tuple(log)})
    message = json.loads(m.collect_data(SERIAL, data))
    documented = json.loads(README_COLLECT_DATA)
    assert list(message) == list(documented)
    assert list(message["measurements"]) == list(documented["measurements"])
    assert isinstance(message["contactor_state"], bool)
    assert 0 <= message["pwm_percent"] <= 255
    meas = message["measurements"]
    assert meas["pilot_voltage"] in ("volt_12", "volt_9", "volt_6", "volt_3", "fault")
    assert meas["proximity_pilot_amps"] in ("amp_13", "amp_20", "amp_32", "no_cable")
    for key in (
        "phase1_millivolts",
        "phase2_millivolts",
        "phase3_millivolts",
        "phase1_milliamps",
        "phase2_milliamps",
        "phase3_milliamps",
        "current_control_pilot_adc",
        "current_proximity_pilot_adc",
    ):
        assert type(meas[key]) is int and 0 <= meas[key] < 2**32, key
    for key in ("wifi_rssi", "uptime_milliseconds"):
        assert type(meas[key]) is int and -(2**31) <= meas[key] < 2**31, key
    assert meas["logging_buffer"] == "".join(line + "\0" for line in log)


def test_error_message_names_request_reason_and_station():
    err = m.BadRequest(
        m.Reason.BAD_VALUE, "pwm_percent must be ...", client_id=SERIAL, request="request_x"
    )
    assert json.loads(m.error(err)) == {
        "message_type": "error",
        "client_id": SERIAL,
        "request": "request_x",
        "reason": "bad_value",
        "error": "pwm_percent must be ...",
    }
    assert json.loads(m.error(m.BadRequest(m.Reason.MALFORMED_JSON, "not JSON"))) == {
        "message_type": "error",
        "reason": "malformed_json",
        "error": "not JSON",
    }


def test_error_message_repeats_at_most_64_characters_of_what_it_got():
    err = m.BadRequest(m.Reason.UNKNOWN_CLIENT_ID, "x", client_id="A" * 1000, request="B" * 1000)
    message = json.loads(m.error(err))
    assert message["client_id"] == "A" * 64 and message["request"] == "B" * 64


# --- requests ----------------------------------------------------------------------------------


def test_the_readme_requests_parse():
    requests = {k: m.parse_request(v.encode()) for k, v in README_REQUESTS.items()}
    assert requests["request_ping"] == m.Request(m.MessageType.REQUEST_PING, SERIAL)
    assert requests["request_data_collection"] == m.Request(
        m.MessageType.REQUEST_DATA_COLLECTION, SERIAL
    )
    assert requests["request_set_contactor_state"] == m.Request(
        m.MessageType.REQUEST_SET_CONTACTOR_STATE, SERIAL, contactor_state=True
    )
    assert requests["request_set_pwm_percent"] == m.Request(
        m.MessageType.REQUEST_SET_PWM_PERCENT, SERIAL, pwm_percent=50
    )


def test_fields_a_request_does_not_need_are_ignored_like_serde_does():
    raw = b'{"message_type":"request_ping","client_id":"X","handshake":null,"pwm_percent":7}'
    assert m.parse_request(raw) == m.Request(m.MessageType.REQUEST_PING, "X")


@pytest.mark.parametrize(
    ("payload", "reason", "client_id", "refused_type"),
    [
        (b"{not json", "malformed_json", None, None),
        (b"\xff\xfe", "malformed_json", None, None),
        (b"", "malformed_json", None, None),
        (b"[1, 2]", "malformed_json", None, None),
        (b'"request_ping"', "malformed_json", None, None),
        (b"[" * 100_000, "malformed_json", None, None),
        (b"[" * 4000, "malformed_json", None, None),
        (
            b'{"message_type": "request_ping", "pad": "%s"}' % (b"x" * 5000),
            "malformed_json",
            None,
            None,
        ),
        (b'{"client_id": "X"}', "wrong_field_type", "X", None),
        (b'{"message_type": 3, "client_id": "X"}', "wrong_field_type", "X", None),
        (b'{"message_type": "request_ping"}', "wrong_field_type", None, "request_ping"),
        (
            b'{"message_type": "request_ping", "client_id": 17}',
            "wrong_field_type",
            None,
            "request_ping",
        ),
        (
            b'{"message_type": "request_reboot", "client_id": "X"}',
            "unknown_message_type",
            "X",
            "request_reboot",
        ),
        (b'{"message_type": "notify", "client_id": "X"}', "unknown_message_type", "X", "notify"),
        (
            b'{"message_type": "request_firmware", "client_id": "X"}',
            "unknown_message_type",
            "X",
            "request_firmware",
        ),
        (
            b'{"message_type": "request_set_pwm_percent", "client_id": "X"}',
            "wrong_field_type",
            "X",
            "request_set_pwm_percent",
        ),
        (
            b'{"message_type": "request_set_pwm_percent", "client_id": "X", "pwm_percent": "50"}',
            "wrong_field_type",
            "X",
            "request_set_pwm_percent",
        ),
        (
            b'{"message_type": "request_set_pwm_percent", "client_id": "X", "pwm_percent": 50.0}',
            "wrong_field_type",
            "X",
            "request_set_pwm_percent",
        ),
        (
            b'{"message_type": "request_set_pwm_percent", "client_id": "X", "pwm_percent": true}',
            "wrong_field_type",
            "X",
            "request_set_pwm_percent",
        ),
        (
            b'{"message_type": "request_set_contactor_state", "client_id": "X", '
            b'"contactor_state": 1}',
            "wrong_field_type",
            "X",
            "request_set_contactor_state",
        ),
        (
            b'{"message_type": "request_set_contactor_state", "client_id": "X", '
            b'"contactor_state": "false"}',
            "wrong_field_type",
            "X",
            "request_set_contactor_state",
        ),
    ],
)
def test_bad_requests_are_refused_with_reason_and_what_was_understood(
    payload, reason, client_id, refused_type
):
    with pytest.raises(m.BadRequest) as refused:
        m.parse_request(payload)
    assert refused.value.reason == reason
    assert refused.value.client_id == client_id
    assert refused.value.request == refused_type
    assert json.loads(m.error(refused.value))["reason"] == reason


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_refused(payload):
    try:
        request = m.parse_request(payload)
    except m.BadRequest as err:
        assert json.loads(m.error(err))["message_type"] == "error"
    else:
        assert request.type in m.RESPONSE_TO


@pytest.mark.parametrize(
    ("percent", "centiamps"),
    [(100, 0), (10, 600), (15, 900), (25, 1500), (26, 1560), (40, 2400), (50, 3000), (53, 3180)],
)
def test_pwm_percent_is_a_current_request(percent, centiamps):
    assert m.pwm_to_centiamps(percent) == centiamps


@pytest.mark.parametrize("percent", [54, 60, 85])
def test_pwm_above_32_a_asks_for_the_most_a_charge_point_takes(percent):
    assert m.pwm_to_centiamps(percent) == 3200


@pytest.mark.parametrize("percent", [0, 1, 9, 86, 96, 99, 101, 255, -1])
def test_pwm_percent_that_is_no_current_is_refused(percent):
    with pytest.raises(ValueError, match=r"pwm_percent must be 10\.\.85"):
        m.pwm_to_centiamps(percent)


def test_every_refusal_of_the_state_machine_has_an_error_reason():
    """bridge-mqtt answers a refused command with the reason of the same name."""
    assert {m.Reason(kind).value for kind in RefusalKind} == {kind.value for kind in RefusalKind}
