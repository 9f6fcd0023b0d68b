"""The station link over real loopback TCP: virtual stations, and hand-made bad peers."""

import asyncio
import contextlib
import ipaddress
import logging

import pytest
from conftest import RawStation, eventually, idle_data

from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.evse.link import LinkObserver, StationLink, StationListener
from openwb_modbus_evse.tools.simulator import VehicleConfig, VirtualStation, virtual_serial

SERIAL = "10BA23AB50534D53302E3120FF162332"


class Recorder(LinkObserver):
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.opened: list[str] = []
        self.closed: list[tuple[str | None, str]] = []

    def protocol_error(self, reason: str) -> None:
        self.errors.append(reason)

    def session_opened(self, serial: str) -> None:
        self.opened.append(serial)

    def session_closed(self, serial: str | None, reason: str) -> None:
        self.closed.append((serial, reason))


@pytest.fixture
async def link():
    recorder = Recorder()
    link = StationLink(
        "127.0.0.1",
        0,
        poll_interval=0.2,
        response_timeout=0.5,
        handshake_timeout=0.5,
        observer=recorder,
    )
    await link.start()
    link.recorder = recorder
    yield link
    await link.close()


@pytest.fixture
async def stations(link):
    started: list[VirtualStation] = []

    async def make(count: int, **options) -> list[VirtualStation]:
        new = [
            VirtualStation(
                virtual_serial(len(started) + i + 1),
                bridge=("127.0.0.1", link.port),
                reconnect_delay=0.1,
                **options,
            )
            for i in range(count)
        ]
        for station in new:
            await station.start()
        started.extend(new)
        await eventually(lambda: all(s.serial in link.sessions for s in new))
        return new

    yield make
    for station in started:
        await station.stop()


def collects(station: VirtualStation) -> int:
    return sum(r.type is p.RequestType.COLLECT_DATA for r in station.received)


async def test_several_stations_are_polled_every_interval(link, stations):
    group = await stations(4)
    before = [collects(s) for s in group]
    await asyncio.sleep(1.0)  # five poll intervals
    for station, start in zip(group, before, strict=True):
        assert 3 <= collects(station) - start <= 7
        session = link.session(station.serial)
        assert session.latest is not None and session.firmware == 4
        assert asyncio.get_running_loop().time() - session.latest_at < 0.5
    assert sorted(link.sessions) == sorted(s.serial for s in group)


async def test_firmware_2_stations_are_decoded_with_the_short_layout(link, stations):
    (station,) = await stations(1, firmware=2)
    data = link.session(station.serial).latest
    assert data.cp_adc is None and data.voltages_mv == (230_000, 230_000, 230_000)


async def test_set_pwm_and_contactor_await_the_acknowledgement(link, stations):
    (station,) = await stations(1)
    session = link.session(station.serial)
    await session.set_pwm(26)
    assert station.pwm == 26  # applied before the ack came back
    await session.set_contactor(True)
    assert station.contactor
    data = await session.collect()
    assert (data.pwm, data.contactor) == (26, True)


async def test_garbage_closes_only_that_session(link, stations):
    group = await stations(2)
    before = [collects(s) for s in group]
    rogue = await RawStation.connect(link.port)
    rogue.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    assert await rogue.closed_by_peer()
    await eventually(lambda: "unknown_frame_type" in link.recorder.errors)
    await asyncio.sleep(0.5)
    for station, start in zip(group, before, strict=True):
        assert collects(station) - start >= 2  # still polled
        assert station.connections == 1  # never dropped
    assert "474554202F6D6574726963732048545450" not in str(link.sessions)  # never registered


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (bytes([7, 0, 0, 0, 0]), "unknown_frame_type"),
        (bytes([2, 0, 0x10, 0, 0]), "oversize"),  # announces 1 MiB
        (p.encode_frame(p.ResponseType.DATA, b"\x00" * 20), "short_data"),
        (p.pong(), "wrong_response"),  # a pong for a collect-data
        (p.encode_frame(p.ResponseType.PWM_ACK, b"x"), "bad_body"),
    ],
)
async def test_malformed_responses_close_the_session_with_a_reason(link, reply, reason, caplog):
    caplog.set_level(logging.WARNING)
    station = await RawStation.connect(link.port, SERIAL)
    assert (await station.next_request()).type is p.RequestType.COLLECT_DATA
    station.send(reply)
    assert await station.closed_by_peer()
    assert link.recorder.errors == [reason]
    assert SERIAL not in link.sessions
    assert any(reason in r.getMessage() for r in caplog.records)


async def test_a_response_nobody_asked_for_is_a_protocol_error(link):
    station = await RawStation.connect(link.port, SERIAL)
    await station.next_request()
    station.send(p.encode_data(idle_data(), 4))
    await eventually(lambda: SERIAL in link.sessions)
    station.send(p.pwm_ack())  # nothing was requested
    assert await station.closed_by_peer()
    assert link.recorder.errors == ["unexpected_response"]


async def test_no_handshake_within_the_limit_closes_the_connection(link):
    silent = await RawStation.connect(link.port)  # sends nothing
    started = asyncio.get_running_loop().time()
    assert await silent.closed_by_peer()
    assert 0.4 <= asyncio.get_running_loop().time() - started < 2
    assert any("no handshake" in reason for _, reason in link.recorder.closed)


async def test_a_peer_that_never_answers_is_dropped_after_the_response_timeout(link):
    station = await RawStation.connect(link.port, SERIAL)
    assert (await station.next_request()).type is p.RequestType.COLLECT_DATA
    assert await station.closed_by_peer()
    assert link.recorder.opened == []
    assert any("no response within 0.5 s" in reason for _, reason in link.recorder.closed)


async def test_silent_virtual_station_is_closed_and_comes_back(link, stations):
    (station,) = await stations(1)
    old = link.session(station.serial)
    station.set_silent(True)
    await eventually(lambda: old.closed, timeout=3)
    assert "no response within" in old.close_reason
    station.set_silent(False)
    await eventually(lambda: station.serial in link.sessions and station.connections == 2)
    assert link.session(station.serial) is not old


async def test_notify_between_request_and_response_and_coalescing(link):
    station = await RawStation.connect(link.port, SERIAL)
    await station.next_request()
    station.send(p.encode_data(idle_data(), 4))
    await eventually(lambda: SERIAL in link.sessions)
    # Three notifies in a row cause one collect-data.
    station.send(p.notify() * 3)
    request = await station.next_request(timeout=0.15)  # well before the 0.2 s poll
    assert request.type is p.RequestType.COLLECT_DATA
    # A notify between that request and its response is fine, and causes one more collect (at
    # the latest with the next regular poll: a notify brings one extra poll a second at most).
    station.send(p.notify() + p.encode_data(idle_data(pwm=30), 4))
    request = await station.next_request(timeout=0.5)
    assert request.type is p.RequestType.COLLECT_DATA
    station.send(p.encode_data(idle_data(pwm=31), 4))
    await eventually(lambda: link.session(SERIAL).latest.pwm == 31)
    assert link.recorder.errors == []


class Events(StationListener):
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def connected(self, session) -> None:
        self.seen.append(("connected", session.serial, session.firmware))

    def notified(self, session) -> None:
        self.seen.append(("notified", session.serial))

    def polled(self, session, data) -> None:
        self.seen.append(("polled", session.serial, data.pwm))


async def test_listeners_hear_the_connection_every_poll_and_every_notify(link):
    events = Events()
    link.listeners.append(events)
    garbage = await RawStation.connect(link.port, "00" * 16)  # handshake, but no station
    await garbage.next_request()
    garbage.send(p.notify())  # before it proved to be a station: not passed on
    station = await RawStation.connect(link.port, SERIAL, firmware=3)
    await station.next_request()
    station.send(p.encode_data(idle_data(pwm=40), 3))
    await eventually(lambda: SERIAL in link.sessions)
    station.send(p.notify())
    await station.next_request(timeout=0.15)
    station.send(p.encode_data(idle_data(pwm=41), 3))
    await station.next_request()  # the next poll
    station.send(p.encode_data(idle_data(pwm=42), 3))
    await eventually(lambda: len(events.seen) == 5)
    assert events.seen == [
        ("connected", SERIAL, 3),
        ("polled", SERIAL, 40),
        ("notified", SERIAL),
        ("polled", SERIAL, 41),
        ("polled", SERIAL, 42),
    ]
    await garbage.close()
    await station.close()


async def test_reconnect_replaces_a_session_whose_station_no_longer_answers(link):
    first = await RawStation.connect(link.port, SERIAL)
    await first.next_request()
    first.send(p.encode_data(idle_data(), 4))
    await eventually(lambda: SERIAL in link.sessions)
    old = link.session(SERIAL)
    second = await RawStation.connect(link.port, SERIAL)
    await second.next_request()
    second.send(p.encode_data(idle_data(pwm=50), 4))
    # The old session is pinged first; the old peer is silent, so it is dead and dropped.
    assert await first.closed_by_peer()
    assert old.closed and "no response" in old.close_reason
    await eventually(lambda: link.sessions.get(SERIAL) not in (None, old))
    assert link.session(SERIAL).latest.pwm == 50
    await second.close()


async def test_an_impostor_does_not_take_over_a_station_that_answers(link, stations):
    (station,) = await stations(1)
    real = link.session(station.serial)
    impostor = await RawStation.connect(link.port, station.serial)
    assert (await impostor.next_request()).type is p.RequestType.COLLECT_DATA
    impostor.send(p.encode_data(idle_data(pwm=50), 4))
    assert await impostor.closed_by_peer()
    assert link.session(station.serial) is real and not real.closed
    assert station.connections == 1
    assert any(
        "refused" in reason and "answers there" in reason for _, reason in link.recorder.closed
    )
    assert sum(r.type is p.RequestType.PING for r in station.received) == 1  # the probe


async def test_a_station_pinned_to_an_address_is_refused_from_another(link):
    link.address_for = lambda serial: ipaddress.ip_network("192.0.2.0/24")
    station = await RawStation.connect(link.port, SERIAL)
    assert await station.closed_by_peer()
    assert SERIAL not in link.sessions
    (reason,) = [reason for _, reason in link.recorder.closed]
    assert (
        reason
        == f"refused: station {SERIAL} may connect only from 192.0.2.0/24, not from 127.0.0.1"
    )
    link.address_for = lambda serial: ipaddress.ip_network("127.0.0.1")
    station = await RawStation.connect(link.port, SERIAL)
    await answer_collect(station, idle_data())
    await eventually(lambda: SERIAL in link.sessions)
    await station.close()


async def test_station_log_lines_are_logged_with_its_name(link, stations, caplog):
    caplog.set_level(logging.INFO, logger="openwb_modbus_evse.station")
    (station,) = await stations(1, vehicle=VehicleConfig(plug_in_after=0.0))
    await eventually(
        lambda: any(
            r.name == "openwb_modbus_evse.station"
            and r.getMessage() == f"station {station.serial} says: pilot 12V->9V"
            for r in caplog.records
        )
    )


async def answer_collect(station: RawStation, data: p.StationData) -> None:
    assert (await station.next_request()).type is p.RequestType.COLLECT_DATA
    station.send(p.encode_data(data, 4))


async def test_station_log_text_cannot_forge_lines_or_drive_a_terminal(link, caplog):
    caplog.set_level(logging.INFO, logger="openwb_modbus_evse.station")
    station = await RawStation.connect(link.port, SERIAL)
    lines = ("ok\nERROR openwb_modbus_evse: forged", "\x1b[2J\x1b[31mred", "A" * 5000)
    await answer_collect(station, idle_data(log_lines=lines))
    await eventually(lambda: SERIAL in link.sessions)
    messages = [r.getMessage() for r in caplog.records if r.name.endswith(".station")]
    assert len(messages) == 3
    assert messages[0] == f"station {SERIAL} says: ok\\nERROR openwb_modbus_evse: forged"
    assert messages[1].endswith("says: \\x1b[2J\\x1b[31mred")
    assert all("\n" not in m and "\x1b" not in m and len(m) < 300 for m in messages)
    assert "[4800 more characters]" in messages[2]


async def test_a_flood_of_station_log_lines_is_rate_limited_and_counted(link, caplog):
    caplog.set_level(logging.INFO, logger="openwb_modbus_evse.station")
    dropped: list[int] = []
    link.observer.log_lines_dropped = dropped.append
    station = await RawStation.connect(link.port, SERIAL)
    flood = idle_data(log_lines=tuple(f"line {i}" for i in range(200)))
    await answer_collect(station, flood)
    await eventually(lambda: SERIAL in link.sessions)
    for _ in range(10):  # a notify gets a collect-data at once
        station.send(p.notify())
        await answer_collect(station, flood)
    await eventually(lambda: sum(dropped) + 30 >= 11 * 200 - 5)
    logged = [r for r in caplog.records if r.name.endswith(".station")]
    assert 30 <= len(logged) <= 32  # the burst, and what ~1 s of 0.5 lines/s adds
    assert sum(dropped) + len(logged) == 11 * 200
    assert link.session(SERIAL).latest.log_lines[-1] == "line 63"  # 64 lines per report


def test_poll_interval_must_stay_below_the_station_limit():
    with pytest.raises(ValueError, match="below 10"):
        StationLink(poll_interval=10)


async def test_a_stray_pong_behind_the_first_data_leaves_nothing_registered(link):
    # Regression (issue 10, finding 7): data and a pong nobody asked for, in one packet. The read
    # loop closes the session before the handshake code registers it.
    station = await RawStation.connect(link.port, SERIAL)
    await station.next_request()
    station.send(p.encode_data(idle_data(), 4) + p.pong())
    assert await station.closed_by_peer()
    await asyncio.sleep(0.1)
    assert SERIAL not in link.sessions
    assert link.recorder.opened == []
    assert link.recorder.errors == ["unexpected_response"]


def reply_to(request: p.Request) -> bytes:
    """What a well-behaved station answers."""
    if request.type is p.RequestType.COLLECT_DATA:
        return p.encode_data(idle_data(), 4)
    return {
        p.RequestType.PING: p.pong(),
        p.RequestType.SET_PWM: p.pwm_ack(),
        p.RequestType.SET_CONTACTOR: p.contactor_ack(),
    }[request.type]


async def test_a_response_whose_caller_gave_up_answers_nobody_else(link):
    station = await RawStation.connect(link.port, SERIAL)
    await answer_collect(station, idle_data())
    await eventually(lambda: SERIAL in link.sessions)
    session = link.session(SERIAL)
    gave_up = asyncio.create_task(session.request(p.Request(p.RequestType.PING)))
    while (request := await station.next_request()).type is not p.RequestType.PING:
        station.send(reply_to(request))  # polls of the control loop
    gave_up.cancel()
    later = asyncio.create_task(session.request(p.Request(p.RequestType.COLLECT_DATA)))
    # The late pong arrives after the next request went out, right before that one's answer.
    station.send(p.pong() + reply_to(await station.next_request()))
    while not later.done():
        with contextlib.suppress(TimeoutError):
            station.send(reply_to(await station.next_request(timeout=0.1)))
    assert (await later).data == idle_data()  # its own answer, not the pong
    assert gave_up.cancelled()
    assert not session.closed and link.recorder.errors == []
    await station.close()


async def test_a_notify_after_every_report_brings_at_most_one_extra_poll_a_second(link):
    """A station (or a peer) that notifies after every report must not drive a poll loop."""
    station = await RawStation.connect(link.port, SERIAL)
    await station.next_request()
    station.send(p.encode_data(idle_data(), 4))
    await eventually(lambda: SERIAL in link.sessions)
    loop = asyncio.get_running_loop()
    polls, started = 0, loop.time()
    while loop.time() - started < 2.0:
        request = await station.next_request(timeout=1.0)
        assert request.type is p.RequestType.COLLECT_DATA
        polls += 1
        station.send(p.encode_data(idle_data(), 4) + p.notify())
    # 0.2 s polls: 10 in 2 s, plus at most one extra a second (before: one per report, hundreds)
    assert polls <= 10 + 2 + 1, polls
