"""A minimal station, light enough to run a thousand of them in the bench process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence

from bench.processes import HOST
from bench.report import BenchError
from openwb_modbus_evse.evse import protocol as p
from openwb_modbus_evse.evse.connection import NEED_DATA, Connection, Response, Role
from openwb_modbus_evse.evse.link import PWM_RAISE_INTERVAL
from openwb_modbus_evse.tools.simulator import vehicle_amps

FIRMWARE = 4
CONNECT_BATCH = 50  # stations connecting at once: stays well inside the listen backlog
STATION_AMPS = 16.0  # what the charging vehicle draws per phase (at most)


class MiniStation(asyncio.Protocol):
    """A minimal Dehne-EVSE station with a plugged vehicle, timestamping every request.

    Handshake on connect; collect-data is answered with data for a vehicle behind a 32 A cable
    (pilot B, or C with ``requests_power``: it then draws up to 16 A per phase while the contactor
    is closed and a current is offered); set-PWM and set-contactor are applied and acknowledged.
    Plain ``asyncio.Protocol`` so that a thousand of them fit in the bench process.
    """

    def __init__(self, serial: str, *, requests_power: bool = False, record: bool = False) -> None:
        self.serial = serial
        self.requests_power = requests_power
        self.pwm = 100
        self.contactor = False
        self.polls: list[float] = []  # arrival times of collect-data requests
        # Every request with its arrival time, for the parts that wait for a command.
        self.requests: asyncio.Queue[tuple[float, p.Request]] | None = (
            asyncio.Queue() if record else None
        )
        self.lost = False
        self.error: str | None = None
        self._connection = Connection(Role.STATION)
        self._transport: asyncio.Transport | None = None
        self._frames: dict[tuple[int, bool], bytes] = {}

    async def connect(self, port: int) -> None:
        """Connect to the bridge's station port (the handshake follows at once)."""
        await asyncio.get_running_loop().create_connection(lambda: self, HOST, port)

    def close(self) -> None:
        """Drop the connection."""
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._connection.send(p.Handshake(self.serial, FIRMWARE)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()  # before decoding: the arrival time
        self._connection.receive_data(data)
        try:
            while (request := self._connection.next_event()) is not NEED_DATA:
                assert isinstance(request, p.Request)  # all a station receives
                self._answer(request, now)
        except p.ProtocolError as err:
            self.error = str(err)
            self.close()

    def _answer(self, request: p.Request, now: float) -> None:
        assert self._transport is not None
        if self.requests is not None:
            self.requests.put_nowait((now, request))
        if request.type is p.RequestType.COLLECT_DATA:
            self.polls.append(now)
            self._transport.write(self._data_frame(request))
        elif request.type is p.RequestType.SET_PWM:
            assert request.pwm is not None
            self.pwm = request.pwm
            self._transport.write(self._connection.send(Response(request)))
        elif request.type is p.RequestType.SET_CONTACTOR:
            assert request.contactor is not None
            self.contactor = request.contactor
            self._transport.write(self._connection.send(Response(request)))
        elif request.type is p.RequestType.PING:
            self._transport.write(self._connection.send(Response(request)))

    def _data_frame(self, request: p.Request) -> bytes:
        # Cached per output state: a thousand stations are polled in bursts, and the bench must
        # not be the slow side (the uptime in a cached frame stands still; only a metric shows it).
        # The bytes of a data response are the same whichever collect-data they answer.
        key = (self.pwm, self.contactor)
        frame = self._frames.get(key)
        if frame is None:
            drawing = self.requests_power and self.contactor
            amps = min(STATION_AMPS, vehicle_amps(self.pwm)) if drawing else 0.0
            pilot = p.Pilot.C_6V if self.requests_power else p.Pilot.B_9V
            data = p.StationData(
                contactor=self.contactor,
                pwm=self.pwm,
                pilot=pilot,
                proximity=p.Proximity.CABLE_32A,
                voltages_mv=(230_000, 230_000, 230_000),
                currents_ma=(round(amps * 1000),) * 3,  # type: ignore[arg-type]
                rssi_dbm=-60,
                uptime_ms=int(time.perf_counter() * 1000) % p.INT32_MAX,
                cp_adc=2720 if self.requests_power else 3310,
                pp_adc=1130,
            )
            frame = self._frames[key] = self._connection.send(Response(request, data))
        return frame

    def drain(self) -> None:
        """Forget the requests received so far."""
        assert self.requests is not None
        while not self.requests.empty():
            self.requests.get_nowait()

    @staticmethod
    async def paced(at: float) -> None:
        """Wait until the service would send the next higher PWM at once: it coalesces raises
        that come sooner than PWM_RAISE_INTERVAL after a PWM change (a write flood), and a
        controller writes every few seconds, not as fast as it can."""
        await asyncio.sleep(max(0.0, at + PWM_RAISE_INTERVAL - time.perf_counter()))

    async def expect(
        self, match: Callable[[p.Request], bool], timeout: float
    ) -> tuple[float, p.Request]:
        """The next request that matches, with its arrival time; others are dropped."""
        assert self.requests is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    at, request = await self.requests.get()
                    if match(request):
                        return at, request
        except TimeoutError:
            why = f" (connection dropped: {self.error or 'by the bridge'})" if self.lost else ""
            raise BenchError(
                f"station {self.serial}: expected request not seen in {timeout:g} s{why}"
            ) from None


async def close_stations(stations: Sequence[MiniStation]) -> None:
    """Close the connections and let the closes go out.

    Before the bridge is stopped: it would otherwise try to stop charging on a station that
    cannot answer while the bench waits for the bridge.
    """
    for station in stations:
        station.close()
    await asyncio.sleep(0.1)


def is_pwm(value: int | None = None) -> Callable[[p.Request], bool]:
    """Matches a set-PWM request (with this duty cycle, if given)."""
    return lambda r: r.type is p.RequestType.SET_PWM and (value is None or r.pwm == value)


def is_collect(r: p.Request) -> bool:
    """Matches a collect-data request."""
    return r.type is p.RequestType.COLLECT_DATA


async def registered(station: MiniStation, timeout: float = 10.0) -> None:
    """Wait for the bridge's first collect-data (it registers the station after the answer)."""
    await station.expect(is_collect, timeout)


def chunks(items: Sequence[MiniStation], size: int) -> Iterator[Sequence[MiniStation]]:
    """``items`` in slices of ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
