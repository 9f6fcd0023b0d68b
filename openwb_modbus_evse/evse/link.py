"""The stations' side of the bridge: an asyncio TCP server, one session per station.

A session reads the handshake, proves the peer is a station with a first collect-data, registers
it by serial (replacing an older session of the same station), then polls it and reconciles: what
the station reports is compared with what its hooks (the charge point) want, and whatever differs
is sent again until the station reports it. One request is in flight at a time; a notify may
arrive between a request and its response and triggers one collect-data (several coalesce).
Frames and their pairing are the connection's (:mod:`.connection`); a session moves the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ..limits import ConnectionLimiter, address_in, host_of
from ..ratelimit import RateLimit
from . import protocol as p
from .connection import NEED_DATA, Connection, Event, Notify, Response, Role
from .protocol import Target

log = logging.getLogger(__name__)
station_log = logging.getLogger(__package__.rsplit(".", 1)[0] + ".station")

# A station's own log lines go to the service log at INFO, bounded per session: a line is cut
# after LOG_LINE_CHARS, a report contributes at most LOG_LINES_PER_REPORT (the firmware keeps only
# 1 KiB of log between two reports), and a token bucket lets LOG_BURST lines through at once and
# LOG_LINES_PER_SECOND after that. What does not pass is counted, and said with the next line.
LOG_LINE_CHARS = 200
LOG_LINES_PER_REPORT = 64
LOG_BURST = 30
LOG_LINES_PER_SECOND = 0.5
# Bytes asked of the socket at a time: a whole data response with a full log buffer.
READ_SIZE = 64 * 1024


# A station that sends a notify after every report must not drive a poll loop: a notify brings at
# most one extra poll per this many seconds (the regular polls go on).
NOTIFY_POLL_INTERVAL = 1.0
SESSION_LOG_BURST = 20
# A vehicle sees at most a few PWM changes per second: a lower current is sent at once, a higher
# one at most this long after the previous PWM change (a write flood is coalesced; a controller
# that writes every few seconds never waits).
PWM_RAISE_INTERVAL = 0.2


def _offers(pwm: int) -> int:
    """An order of what a duty cycle offers: IEC 61851's 10..96 % rise with the current; 100 %
    (stop) and 0 % (state F) offer nothing."""
    return pwm if 10 <= pwm <= 96 else 0


class SessionClosed(ConnectionError):
    """The session ended while a request was waiting."""


class StationHooks(Protocol):
    """What a session needs from the rest of the service for one station."""

    name: str

    def observe(self, data: p.StationData, now: float) -> None:
        """New data from the station."""

    def tick(self, now: float) -> None:
        """Time passed; called before every decision."""

    def target(self, now: float) -> Target | None:
        """What the station should report; None to leave it alone."""

    def next_deadline(self) -> float | None:
        """When ``tick`` must run at the latest."""

    def disconnected(self, now: float, reason: str) -> None:
        """The session ended."""


class LinkObserver:
    """Receives what the link counts (for metrics); every method does nothing here."""

    def session_opened(self, serial: str) -> None:
        """A station's session was established."""

    def session_closed(self, serial: str | None, reason: str) -> None:
        """A connection ended (serial None if it never got that far)."""

    def protocol_error(self, reason: str) -> None:
        """A peer sent something malformed."""

    def command_rtt(self, command: str, seconds: float) -> None:
        """A request was answered after ``seconds``."""

    def log_lines_dropped(self, count: int) -> None:
        """``count`` station log lines were not logged (rate or size limit)."""


class StationListener:
    """Hears what every station does, for interfaces that pass it on; does nothing here.

    Called from the session's task: a listener must not block or raise.
    """

    def connected(self, session: Session) -> None:
        """A station proved itself (after its handshake and first data) and was registered."""

    def notified(self, session: Session) -> None:
        """The station sent a notify."""

    def polled(self, session: Session, data: p.StationData) -> None:
        """The station reported its data (after every poll)."""


class _PassiveHooks:
    """Hooks of a link used on its own: observe, never command."""

    def __init__(self, name: str) -> None:
        self.name = name

    def observe(self, data: p.StationData, now: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def target(self, now: float) -> Target | None:
        return None

    def next_deadline(self) -> float | None:
        return None

    def disconnected(self, now: float, reason: str) -> None:
        pass


class Session:
    """One station's TCP connection."""

    def __init__(
        self, link: StationLink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.link = link
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        host, port = (peer[0], peer[1]) if peer else ("?", 0)
        self.host = host_of(peer) if peer else host  # IPv4-mapped addresses as IPv4
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.serial: str | None = None
        self.firmware = 0
        self.mac: str | None = None  # from the neighbour table, when the station registers
        # False: the peer sent the ID of a station last seen elsewhere (see identity.py); it is
        # kept safe by its hooks, and the link's listeners do not hear of it.
        self.recognised = True
        self.hooks: StationHooks = _PassiveHooks(self.peer)
        self.latest: p.StationData | None = None
        self.latest_at: float | None = None
        self.closed = False
        self.close_reason = ""
        self._connection = Connection(Role.SERVICE, link.calibration_for)
        self._lock = asyncio.Lock()
        # The connection pairs each response with its request; these are the callers waiting for
        # them, in the same order (one, unless a caller gave up before its response came).
        self._callers: deque[asyncio.Future[Response]] = deque()
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._notified = False
        self._notify_poll_at = 0.0  # the earliest time a notify may bring a poll
        self._pwm_sent_at = -PWM_RAISE_INTERVAL  # when the latest PWM command went out
        self._last_sent: tuple[Target, float] | None = None
        self._sent_at: float | None = None  # when the latest command went out
        self._retry_at: float | None = None
        self._loop = asyncio.get_running_loop()
        self._log_limit = RateLimit(LOG_LINES_PER_SECOND, LOG_BURST, kind="station_log")

    @property
    def name(self) -> str:
        """How the station is called in logs."""
        return self.hooks.name if self.serial else self.peer

    @property
    def unconfirmed(self) -> bool:
        """A command went out that no report since has shown (the station may have applied it
        already: its latest report is older)."""
        sent = self._sent_at
        return sent is not None and (self.latest_at is None or self.latest_at <= sent)

    async def wait_closed(self) -> None:
        """Return once the session has ended."""
        await self._ended.wait()

    def wake(self) -> None:
        """Make the control loop look at the hooks' target now."""
        self._wake.set()

    def promote(self, hooks: StationHooks) -> None:
        """The owner confirmed that this peer is the station: ``hooks`` drive it from now on."""
        self.recognised, self.hooks = True, hooks
        for listener in self.link.listeners:
            listener.connected(self)
        if self.latest is not None and self.latest_at is not None:
            hooks.observe(self.latest, self.latest_at)
        self.wake()

    # --- requests ---------------------------------------------------------------------------

    async def request(self, request: p.Request) -> Response:
        """Send one request and wait for the station's response to it."""
        expect = p.EXPECTED_RESPONSE.get(request.type)
        if expect is None:
            raise ValueError(f"{request.type.name} is never answered")
        async with self._lock:
            if self.closed:
                raise SessionClosed(self.close_reason)
            frame = self._connection.send(request)
            future: asyncio.Future[Response] = self._loop.create_future()
            self._callers.append(future)
            started = self._loop.time()
            self._writer.write(frame)
            try:
                response = await asyncio.wait_for(future, self.link.response_timeout)
            except TimeoutError:
                self.close(f"no response within {self.link.response_timeout:g} s")
                raise SessionClosed(self.close_reason) from None
            if self.closed:
                # The read loop may resolve the future and then close the session on the next
                # frame of the same packet before this coroutine runs: acting on that response
                # (registering, observing) would revive a session that already ended.
                raise SessionClosed(self.close_reason)
            self.link.observer.command_rtt(expect.name.lower(), self._loop.time() - started)
            return response

    async def _collect_data(self) -> p.StationData:
        data = (await self.request(p.Request(p.RequestType.COLLECT_DATA))).data
        assert data is not None  # the connection pairs a collect-data with data only
        return data

    async def collect(self) -> p.StationData:
        """Collect data, remember it and hand it to the hooks."""
        data = await self._collect_data()
        self._accept(data)
        return data

    def _accept(self, data: p.StationData) -> None:
        now = self._loop.time()
        if data.log_lines:
            data = replace(data, log_lines=self._log_station_lines(data.log_lines, now))
        self.latest, self.latest_at = data, now
        self.hooks.observe(data, now)
        if self.recognised:
            for listener in self.link.listeners:
                listener.polled(self, data)

    def _log_station_lines(self, raw: tuple[str, ...], now: float) -> tuple[str, ...]:
        """Log the station's lines within the limits; returns them made safe for display."""
        lines = tuple(printable(line) for line in raw[:LOG_LINES_PER_REPORT])
        dropped = len(raw) - len(lines)
        for line in lines:
            if self._log_limit.allow(now):
                before = self._log_limit.take_dropped()
                note = f" ({before} lines dropped before this one)" if before else ""
                station_log.info("station %s says: %s%s", self.name, line, note)
            else:
                dropped += 1
        if dropped:
            self.link.observer.log_lines_dropped(dropped)
        return lines

    async def probe(self) -> bool:
        """Ping the station: True if it answers (the session stays), False if it has ended."""
        try:
            await self.request(p.Request(p.RequestType.PING))
        except SessionClosed:
            return False
        return True

    async def upload_firmware(self, image: bytes, may_send: Callable[[], None]) -> None:
        """Send a firmware image (never answered); ``may_send`` may still refuse, just before."""
        async with self._lock:  # not in the middle of another request
            if self.closed:
                raise SessionClosed(self.close_reason)
            may_send()
            upload = p.Request(p.RequestType.FIRMWARE_UPLOAD, image=image)
            self._writer.write(self._connection.send(upload))
            await self._writer.drain()

    async def set_pwm(self, percent: int) -> None:
        """Set the PWM duty cycle; returns once the station acknowledged it."""
        await self.request(p.Request(p.RequestType.SET_PWM, pwm=percent))

    async def set_contactor(self, on: bool) -> None:
        """Switch the contactor; returns once the station acknowledged it."""
        await self.request(p.Request(p.RequestType.SET_CONTACTOR, contactor=on))

    # --- lifecycle --------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """End the session (idempotent); waiting requests fail with :class:`SessionClosed`."""
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        for future in self._callers:
            if not future.done():
                future.set_exception(SessionClosed(reason))
        self._callers.clear()
        self._wake.set()
        self._ended.set()
        self._writer.close()
        self.link._session_ended(self, reason)

    def _protocol_error(self, err: p.ProtocolError) -> None:
        self.link.observer.protocol_error(err.reason)
        self.close(f"protocol error ({err.reason}): {err}")

    async def run(self) -> None:
        """Serve the connection until it ends."""
        reader_task: asyncio.Task[None] | None = None
        try:
            handshake = await self._handshake()
            self._check_address(handshake.serial)
            reader_task = asyncio.create_task(self._read_loop())
            # Only a peer that answers a collect-data like a station is registered: garbage on
            # the port must not claim a serial (and with it a charge point).
            first = await self._collect_data()
            self.serial = handshake.serial
            await self.link._register(self)
            self.link.log_session(
                logging.INFO,
                "station %s (%s, firmware %d) connected from %s",
                self.name,
                self.serial,
                self.firmware,
                self.peer,
            )
            if self.recognised:
                for listener in self.link.listeners:
                    listener.connected(self)
            self._accept(first)
            await self._control_loop()
        except p.ProtocolError as err:
            self._protocol_error(err)
        except (SessionClosed, ConnectionError) as err:
            self.close(str(err) or "connection lost")
        except Exception:  # a bug must cost this session only, and say where it was
            log.exception("station %s: internal error", self.name)
            self.close("internal error")
        finally:
            self.close(self.close_reason or "session ended")
            if reader_task is not None:
                reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader_task
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    def _check_address(self, serial: str) -> None:
        network = self.link.address_for(serial)
        if network is not None and not address_in(self.host, (network,)):
            raise SessionClosed(
                f"refused: station {serial} may connect only from {network}, not from {self.host}"
            )

    async def _next_event(self) -> Event:
        """The station's next event; EOFError once it closed the connection."""
        while (event := self._connection.next_event()) is NEED_DATA:
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise EOFError
            self._connection.receive_data(data)
        return event

    async def _handshake(self) -> p.Handshake:
        try:
            async with asyncio.timeout(self.link.handshake_timeout):
                handshake = await self._next_event()
        except TimeoutError:
            raise SessionClosed(f"no handshake within {self.link.handshake_timeout:g} s") from None
        except EOFError:
            raise SessionClosed("connection closed during the handshake") from None
        assert isinstance(handshake, p.Handshake)  # a station's first event, always
        self.firmware = handshake.firmware
        return handshake

    async def _read_loop(self) -> None:
        try:
            while True:
                event = await self._next_event()
                if isinstance(event, Notify):
                    if self.recognised and self.serial is not None and not self._notified:
                        # coalesced, as the poll
                        for listener in self.link.listeners:
                            listener.notified(self)
                    self._notified = True
                    self._wake.set()
                elif isinstance(event, Response):
                    future = self._callers.popleft()
                    if not future.done():  # its caller may have given up
                        future.set_result(event)
        except p.ProtocolError as err:
            self._protocol_error(err)
        except (EOFError, ConnectionError):
            self.close("the station closed the connection")
        except Exception:
            log.exception("station %s: internal error while reading", self.name)
            self.close("internal error")

    async def _control_loop(self) -> None:
        poll = self.link.poll_interval
        next_poll = self._loop.time() + poll
        while not self.closed:
            now = self._loop.time()
            self.hooks.tick(now)
            sent = await self._reconcile(now)
            notify_due = self._notified and now >= self._notify_poll_at
            if sent or notify_due or now >= next_poll:
                if notify_due and not sent:
                    self._notify_poll_at = now + NOTIFY_POLL_INTERVAL
                self._notified = False
                await self.collect()  # after commands: confirms them (or shows they failed)
                next_poll = self._loop.time() + poll
                continue
            notify_at = self._notify_poll_at if self._notified else None
            times = (next_poll, self.hooks.next_deadline(), self._retry_at, notify_at)
            wake_at = min(t for t in times if t is not None)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - self._loop.time()))

    async def _reconcile(self, now: float) -> bool:
        """Send what differs between the hooks' target and the latest data; True if sent."""
        want, data = self.hooks.target(now), self.latest
        assert data is not None
        self._retry_at = None
        if want is None or (want.pwm == data.pwm and want.contactor == data.contactor):
            return False
        if self._last_sent is not None and self._last_sent[0] == want:
            # A station that acknowledges but does not follow gets the same command again once
            # per poll interval, not in a tight loop.
            self._retry_at = self._last_sent[1] + self.link.poll_interval
            if now < self._retry_at:
                return False
        raise_at = self._pwm_sent_at + PWM_RAISE_INTERVAL
        if want.pwm != data.pwm and _offers(want.pwm) > _offers(data.pwm) and now < raise_at:
            self._retry_at = raise_at  # a higher current waits; a lower one would not
            return False
        self._sent_at = now
        if want.pwm != data.pwm:  # PWM first: a stop must announce itself to the vehicle
            self._pwm_sent_at = now
            await self.set_pwm(want.pwm)
        if want.contactor != data.contactor:
            await self.set_contactor(want.contactor)
        self._last_sent = (want, now)
        return True


def printable(line: str) -> str:
    """``line`` with control and non-ASCII characters escaped, cut after LOG_LINE_CHARS.

    A station's text must not forge log lines (newline) or drive a terminal (ANSI escapes).
    """
    if len(line) > LOG_LINE_CHARS:
        line = line[:LOG_LINE_CHARS] + f"... [{len(line) - LOG_LINE_CHARS} more characters]"
    if line.isascii() and line.isprintable():
        return line
    return "".join(c if c.isascii() and c.isprintable() else ascii(c)[1:-1] for c in line)


class StationLink:
    """TCP server the stations connect to; keeps one session per serial."""

    def __init__(
        self,
        host: str = "::",
        port: int = 9091,
        *,
        poll_interval: float = 5.0,
        response_timeout: float = 5.0,
        handshake_timeout: float = 10.0,
        attach: Callable[[Session], StationHooks] | None = None,
        calibration_for: Callable[[str], p.StationCalibration] | None = None,
        address_for: Callable[[str], ipaddress.IPv4Network | ipaddress.IPv6Network | None]
        | None = None,
        recognises: Callable[[Session], bool] | None = None,
        neighbours: Callable[[str], str | None] | None = None,
        observer: LinkObserver | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        if not 0 < poll_interval < p.STATION_IDLE_TIMEOUT:
            raise ValueError(
                f"poll_interval must be above 0 and below {p.STATION_IDLE_TIMEOUT:g} s "
                f"(the station drops the connection after {p.STATION_IDLE_TIMEOUT:g} s without a "
                f"request), got {poll_interval:g}"
            )
        self.host, self.port = host, port
        self.poll_interval = poll_interval
        self.response_timeout = response_timeout
        self.handshake_timeout = handshake_timeout
        self._attach = attach
        self.calibration_for = calibration_for or (lambda serial: p.NO_CALIBRATION)
        self.address_for = address_for or (lambda serial: None)
        # Whether a registering session is the station as the service knows it (identity.py),
        # and the MAC address of a peer (neighbours.py).
        self.recognises = recognises or (lambda session: True)
        self.neighbours = neighbours or (lambda host: None)
        self.observer = observer or LinkObserver()
        self.limiter = limiter or ConnectionLimiter.unbounded("evse")
        self.listeners: list[StationListener] = []
        self.sessions: dict[str, Session] = {}
        self._all: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        # Connect and close lines: a peer that connects and closes in a loop must not fill the
        # log (a burst, then one a second, saying how many were left out).
        self._session_log = RateLimit(1.0, SESSION_LOG_BURST, kind="station_session")

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (read it back from ``self.port``)."""
        try:
            self._server = await self._listen()
        except OSError as err:
            raise OSError(
                f"cannot listen for stations on [{self.host}]:{self.port}: {err.strerror or err}"
            ) from err
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening for stations on [%s]:%d", self.host, self.port)

    async def _listen(self) -> asyncio.Server:
        if self.host != "::" or not socket.has_ipv6:
            return await asyncio.start_server(self._accept, self.host, self.port)
        # asyncio makes IPv6 sockets IPv6-only; "::" should take IPv4 stations too, as the
        # firmware's server address is usually an IPv4 one.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", self.port))
        except OSError:
            sock.close()
            raise
        return await asyncio.start_server(self._accept, sock=sock)

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._server is not None:
            self._server.close()
        for session in list(self._all):
            session.close("the bridge is shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def session(self, serial: str) -> Session:
        """The established session of a station (KeyError if it is not connected)."""
        return self.sessions[serial]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = host_of(writer.get_extra_info("peername"))
        if self.limiter.admit(host) is not None:
            writer.transport.abort()
            return
        try:
            await self._serve(reader, writer)
        finally:
            self.limiter.release(host)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self._all.add(session)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await session.run()
        finally:
            self._all.discard(session)
            self._tasks.discard(task)

    async def _register(self, session: Session) -> None:
        serial = session.serial
        assert serial is not None
        session.mac = self.neighbours(session.host)
        session.recognised = self.recognises(session)
        # A second connection with the serial of a live session does not win outright: anyone
        # on the LAN can send a serial. The live session is pinged first and keeps its place if
        # the station answers; if it does not, it is closed (dead) and the newcomer takes over.
        # Only the station from where it is known replaces a mere claimant at once.
        while (old := self.sessions.get(serial)) is not None and not session.closed:
            if session.recognised and not old.recognised:
                old.close(f"replaced: station {serial} connected from where it is known")
            elif await old.probe():
                raise SessionClosed(
                    f"refused: station {serial} is connected from {old.peer} and answers there"
                )
        if session.closed:  # its end was already reported with no serial: nothing would undo it
            raise SessionClosed(session.close_reason)
        self.sessions[serial] = session
        if self._attach is not None:
            session.hooks = self._attach(session)
        else:
            session.hooks = _PassiveHooks(session.serial)
        self.observer.session_opened(session.serial)

    def log_session(self, level: int, message: str, *args: object) -> None:
        """A line about a session starting or ending, rate-limited."""
        if self._session_log.allow(asyncio.get_running_loop().time()):
            log.log(level, message + "%s", *args, self._session_log.left_out())

    def _session_ended(self, session: Session, reason: str) -> None:
        level = logging.INFO if reason.startswith(("replaced", "the bridge")) else logging.WARNING
        self.log_session(level, "station %s: session closed: %s", session.name, reason)
        self.observer.session_closed(session.serial, reason)
        if session.serial is not None and self.sessions.get(session.serial) is session:
            del self.sessions[session.serial]
            session.hooks.disconnected(asyncio.get_running_loop().time(), reason)
