"""A virtual Dehne-EVSE station with a virtual vehicle, speaking the real wire protocol.

Like the real station it is the TCP client: it connects to the bridge, sends its handshake and
answers every request, reconnecting when the connection drops. Used by the ``simulate`` CLI
command (through :func:`run_simulators`) and in-process by the bridge's integration tests.

Everything runs on the event loop: one task per station for the connection, and ``call_at``
timers for the vehicle and the safety net, so state changes happen between frames, never inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..evse import protocol
from ..evse.connection import NEED_DATA, Connection, Event, Notify, Response, Role
from ..evse.protocol import (
    STATION_IDLE_TIMEOUT,
    STATION_SAFETY_TIMEOUT,
    Pilot,
    ProtocolError,
    Proximity,
    Request,
    RequestType,
    StationData,
)

logger = logging.getLogger(__name__)

#: The firmware keeps this much log between two data responses.
LOG_BUFFER_SIZE = 1024
READ_SIZE = 64 * 1024  # bytes asked of the socket at a time
RSSI_DBM = -62
_SERIAL_PREFIX = b"VIRTUAL".hex().upper()  # "5649525455414C", 14 of the 32 digits
_INT32 = 2**32
_UINT32_MAX = 2**32 - 1

# Raw 12-bit ADC readings a real board shows for each pilot level / cable resistor; only there
# so that firmware >= 3 data responses carry believable numbers.
_CP_ADC = {Pilot.A_12V: 3890, Pilot.B_9V: 3310, Pilot.C_6V: 2720, Pilot.D_3V: 2130}
_PP_ADC = {
    Proximity.CABLE_13A: 2950,
    Proximity.CABLE_20A: 2040,
    Proximity.CABLE_32A: 1130,
    Proximity.NO_CABLE: 4095,
}
_PILOT_VOLTS = {
    Pilot.A_12V: "12V",
    Pilot.B_9V: "9V",
    Pilot.C_6V: "6V",
    Pilot.D_3V: "3V",
    Pilot.FAULT: "fault",
    Pilot.MINUS_12V: "-12V",
}


def _volts(pilot: Pilot) -> str:
    return _PILOT_VOLTS.get(pilot, "?")


def vehicle_amps(duty: int) -> float:
    """The current a vehicle may draw at a PWM duty cycle in percent (IEC 61851-1, Annex A).

    The vehicle's side of the table, written here on purpose rather than taken from the service:
    a vehicle built on the service's own formula would hide any error in it.
    """
    if 10 <= duty <= 85:
        return duty * 0.6
    if 85 < duty <= 96:
        return (duty - 64) * 2.5
    return 0.0  # outside the table: no charging


@dataclass(frozen=True)
class VehicleConfig:
    """How the virtual vehicle behaves."""

    plug_in_after: float | None = 0.0  # seconds after start() until plugged in; None = never
    unplug_after: float | None = None  # seconds after plug-in until unplugged; None = never
    max_current_a: float = 16.0  # the vehicle's own current limit
    phases: int = 3  # 1 or 3
    reaction_s: float = 0.5  # how long the vehicle takes to react to a PWM change

    def __post_init__(self) -> None:
        if self.phases not in (1, 3):
            raise ValueError(f"phases must be 1 or 3, got {self.phases}")
        if self.max_current_a < 0 or self.reaction_s < 0:
            raise ValueError("max_current_a and reaction_s must not be negative")


def virtual_serial(index: int) -> str:
    """Deterministic serial of virtual station ``index``: "VIRTUAL" in hex, then 18 hex digits."""
    if not 0 <= index < 16**18:
        raise ValueError(f"virtual station index out of range: {index}")
    return f"{_SERIAL_PREFIX}{index:018X}"


class VirtualStation:
    """A Dehne-EVSE station (TCP client) with one virtual vehicle.

    Read-only state is exposed as properties; ``plug_in``/``unplug``/``set_silent`` drive it, and
    ``wait_for`` lets tests await a condition. Timers need a running event loop, so call the
    controls from inside it.
    """

    def __init__(
        self,
        serial: str,
        *,
        firmware: int = 4,
        bridge: tuple[str, int] = ("127.0.0.1", 9091),
        vehicle: VehicleConfig | None = None,
        proximity: Proximity = Proximity.CABLE_32A,
        voltage_v: float = 230.0,
        voltage_jitter_v: float = 0.0,
        reconnect_delay: float = 5.0,
        request_timeout: float = STATION_IDLE_TIMEOUT,
        safety_timeout: float = STATION_SAFETY_TIMEOUT,
        name: str | None = None,
        firmware_update: str = "reboot",
        firmware_after_update: int | None = None,
        relay: Callable[[], int] | None = None,
        source: str | None = None,
    ) -> None:
        """``vehicle=None`` means a default vehicle that is only plugged in by ``plug_in()``.

        ``relay`` says how many phases (1 or 3) an external phase relay connects right now (it
        is outside the station, like a real one: e.g. a test reads what its relay command
        wrote); the vehicle draws on no more. None: all three are connected.

        A firmware upload with a good CRC makes the station ``"reboot"`` (drop the connection,
        come back after ``reconnect_delay`` with ``firmware_after_update``, if given),
        ``"ignore"`` it, or ``"die"`` (drop the connection and never come back).

        ``source``: the local address to connect from (a test's second host: 127.0.0.2).
        """
        if firmware_update not in ("reboot", "ignore", "die"):
            raise ValueError(
                f"firmware_update must be reboot, ignore or die, not {firmware_update}"
            )
        protocol.encode_handshake(serial, firmware)  # raises ValueError early on a bad serial
        if len(serial) != 32:
            raise ValueError(f"serial must be 32 hex digits, got {serial!r}")
        self._serial = serial.upper()
        self._firmware = firmware
        self._bridge = bridge
        self._vehicle = vehicle or VehicleConfig(plug_in_after=None)
        self._proximity = proximity
        self._voltage_v = voltage_v
        self._voltage_jitter_v = voltage_jitter_v
        self._reconnect_delay = reconnect_delay
        self._request_timeout = request_timeout
        self._safety_timeout = safety_timeout
        self.name = name or self._serial
        self._firmware_update = firmware_update
        self._firmware_after_update = firmware_after_update
        self._relay = relay
        self._source = source
        self._uploads: list[bytes] = []
        self._rebooting = False

        # Station state, as after power-on.
        self._pwm = 100
        self._contactor = False
        self._plugged = False
        # Vehicle state: whether it asks for power (pilot C) and the current it has accepted.
        self._wants_power = False
        self._vehicle_amps = 0.0

        self._silent = False
        self._connected = False
        self._connections = 0
        self._received: list[Request] = []
        self._notifies_sent = 0
        self._log_lines: deque[str] = deque()
        self._log_bytes = 0
        self._rng = random.Random()

        self._task: asyncio.Task[None] | None = None
        # The connection to the bridge while there is one, with the writer of its socket.
        self._peer: tuple[Connection, asyncio.StreamWriter] | None = None
        self._started_at: float | None = None
        self._plug_timer: asyncio.TimerHandle | None = None
        self._unplug_timer: asyncio.TimerHandle | None = None
        self._reaction_timer: asyncio.TimerHandle | None = None
        self._safety_timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    # --- read-only state ------------------------------------------------------------------

    @property
    def serial(self) -> str:
        """32 uppercase hex digits, as sent in the handshake."""
        return self._serial

    @property
    def firmware(self) -> int:
        """Firmware version sent in the handshake; < 3 means the short data response."""
        return self._firmware

    @property
    def pwm(self) -> int:
        """PWM duty cycle in percent (100 = no charging allowed, 0 = state F)."""
        return self._pwm

    @property
    def contactor(self) -> bool:
        """Contactor closed."""
        return self._contactor

    @property
    def plugged(self) -> bool:
        """The vehicle is plugged in."""
        return self._plugged

    @property
    def proximity(self) -> Proximity:
        """Proximity-pilot reading reported in data responses."""
        return self._proximity

    @property
    def pilot(self) -> Pilot:
        """Control-pilot state as the station measures it."""
        if self._pwm == 0:
            return Pilot.FAULT  # constant -12 V, with or without a vehicle
        if not self._plugged:
            return Pilot.A_12V
        return Pilot.C_6V if self._wants_power else Pilot.B_9V

    @property
    def currents_ma(self) -> tuple[int, int, int]:
        """Phase currents in mA that the vehicle draws right now."""
        if not (self._plugged and self._contactor and self._wants_power):
            return (0, 0, 0)
        ma = round(min(self._vehicle_amps, self._vehicle.max_current_a) * 1000)
        phases = min(self._vehicle.phases, self._relay() if self._relay is not None else 3)
        others = ma if phases == 3 else 0
        return (ma, others, others)

    @property
    def connected(self) -> bool:
        """A connection to the bridge is up (handshake sent)."""
        return self._connected

    @property
    def connections(self) -> int:
        """How many times a connection was established."""
        return self._connections

    @property
    def received(self) -> list[Request]:
        """Every decoded request, in order (also those ignored while silent)."""
        return self._received

    @property
    def notifies_sent(self) -> int:
        """How many notify frames were written."""
        return self._notifies_sent

    @property
    def uploads(self) -> list[bytes]:
        """Every firmware image received with a good CRC, in order."""
        return self._uploads

    @property
    def silent(self) -> bool:
        """Requests are read but neither applied nor answered."""
        return self._silent

    def __repr__(self) -> str:
        return (
            f"<VirtualStation {self.name} connected={self._connected} pwm={self._pwm} "
            f"contactor={self._contactor} pilot={self.pilot.name} currents={self.currents_ma}>"
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task (connect, serve, reconnect) and return at once."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._arm_safety()
        if self._vehicle.plug_in_after is not None:
            self._plug_timer = loop.call_later(self._vehicle.plug_in_after, self.plug_in)
        self._task = asyncio.create_task(self._run(), name=f"virtual-station-{self.name}")
        self._task.add_done_callback(self._task_done)

    async def stop(self) -> None:
        """Close the connection and end the task; idempotent."""
        for handle in (
            self._plug_timer,
            self._unplug_timer,
            self._reaction_timer,
            self._safety_timer,
        ):
            if handle is not None:
                handle.cancel()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error  # a bug in the simulator: let the caller (a test) see it

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: simulator task crashed", self.name, exc_info=task.exception())

    # --- controls -------------------------------------------------------------------------

    def plug_in(self) -> None:
        """Plug the vehicle in (pilot B; C once a charging PWM has been seen for reaction_s)."""
        if self._plugged:
            return
        before = self._observe()
        self._plugged = True
        self._wants_power = False
        self._vehicle_amps = 0.0
        self._schedule_reaction()
        if self._vehicle.unplug_after is not None:
            self._unplug_timer = asyncio.get_running_loop().call_later(
                self._vehicle.unplug_after, self.unplug
            )
        self._after(before, by_command=False)

    def unplug(self) -> None:
        """Unplug the vehicle: pilot A and no current at once; the contactor stays as it is."""
        if self._unplug_timer is not None:
            self._unplug_timer.cancel()
            self._unplug_timer = None
        if not self._plugged:
            return
        before = self._observe()
        self._plugged = False
        self._wants_power = False
        self._vehicle_amps = 0.0
        self._cancel_reaction()
        self._after(before, by_command=False)

    def set_silent(self, silent: bool) -> None:
        """Silent: keep the connection and read requests, but apply and answer nothing."""
        self._silent = silent
        self._touch()

    async def wait_for(
        self, predicate: Callable[[VirtualStation], bool], timeout: float = 5.0
    ) -> None:
        """Return once ``predicate(self)`` is true; raise TimeoutError after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed
                    if predicate(self):
                        return
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{self!r}: condition not met within {timeout} s") from None

    # --- vehicle and station state --------------------------------------------------------

    def _observe(self) -> tuple[Pilot, bool]:
        # What the station notices by itself: the pilot level and whether current flows.
        return self.pilot, any(self.currents_ma)

    def _after(self, before: tuple[Pilot, bool], *, by_command: bool) -> None:
        """Log what changed since ``before``; notify the bridge unless a command caused it."""
        pilot, drawing = self._observe()
        if pilot != before[0]:
            self._log(f"pilot {_volts(before[0])}->{_volts(pilot)}")
        if drawing != before[1]:
            self._log(f"current {self.currents_ma[0] / 1000:.1f}A" if drawing else "current off")
        if not by_command and (pilot, drawing) != before:
            self._send_notify()
        self._touch()

    def _set_pwm(self, pwm: int) -> None:
        if pwm == self._pwm:
            return  # a repeated PWM is no change for the vehicle, so no new reaction
        self._log(f"pwm {pwm}%")
        self._pwm = pwm
        if pwm == 0:
            # State F: the vehicle sees -12 V and stops at once.
            self._cancel_reaction()
            self._wants_power = False
            self._vehicle_amps = 0.0
        else:
            self._schedule_reaction()

    def _set_contactor(self, on: bool) -> None:
        if on != self._contactor:
            self._log("contactor on" if on else "contactor off")
            self._contactor = on

    def _schedule_reaction(self) -> None:
        self._cancel_reaction()
        if self._plugged and self._pwm != 0:
            self._reaction_timer = asyncio.get_running_loop().call_later(
                self._vehicle.reaction_s, self._vehicle_react
            )

    def _cancel_reaction(self) -> None:
        if self._reaction_timer is not None:
            self._reaction_timer.cancel()
            self._reaction_timer = None

    def _vehicle_react(self) -> None:
        """The vehicle follows the PWM it sees now: C at the offered current, or back to B."""
        self._reaction_timer = None
        if not self._plugged or self._pwm == 0:
            return
        before = self._observe()
        self._vehicle_amps = vehicle_amps(self._pwm)
        self._wants_power = self._vehicle_amps > 0
        self._after(before, by_command=False)

    def _arm_safety(self) -> None:
        if self._safety_timer is not None:
            self._safety_timer.cancel()
        self._safety_timer = asyncio.get_running_loop().call_later(
            self._safety_timeout, self._safety_trip
        )

    def _safety_trip(self) -> None:
        """No request for safety_timeout s: switch off by itself, like the firmware."""
        self._safety_timer = None
        if not self._contactor and self._pwm == 100:
            return
        logger.warning(
            "%s: no request for %s s, switching the contactor off", self.name, self._safety_timeout
        )
        self._log("safety timeout")
        before = self._observe()
        self._set_contactor(False)
        self._set_pwm(100)
        self._after(before, by_command=True)
        self._send_notify()  # the station changed its own outputs: the bridge must hear of it

    def _log(self, line: str) -> None:
        logger.debug("%s: %s", self.name, line)
        self._log_lines.append(line)
        self._log_bytes += len(line) + 1  # NUL terminator
        while self._log_bytes > LOG_BUFFER_SIZE:
            self._log_bytes -= len(self._log_lines.popleft()) + 1

    def _touch(self) -> None:
        # Wake every wait_for() so it re-checks its predicate.
        self._changed.set()
        self._changed = asyncio.Event()

    # --- wire -----------------------------------------------------------------------------

    def _send(self, event: Event) -> bool:
        # One write() per whole frame, so a notify from a timer can never split another frame.
        if self._peer is None or self._silent:
            return False
        connection, writer = self._peer
        if writer.is_closing():
            return False
        writer.write(connection.send(event))
        return True

    def _send_notify(self) -> None:
        if self._send(Notify()):
            self._notifies_sent += 1

    def _voltage_mv(self) -> int:
        volts = self._voltage_v
        if self._voltage_jitter_v:
            volts += self._rng.uniform(-self._voltage_jitter_v, self._voltage_jitter_v)
        return min(_UINT32_MAX, max(0, round(volts * 1000)))  # uint32 on the wire

    def _data(self) -> StationData:
        loop = asyncio.get_running_loop()
        uptime_ms = int((loop.time() - (self._started_at or loop.time())) * 1000)
        voltages = (self._voltage_mv(), self._voltage_mv(), self._voltage_mv())
        pilot = self.pilot
        data = StationData(
            contactor=self._contactor,
            pwm=self._pwm,
            pilot=pilot,
            proximity=self._proximity,
            voltages_mv=voltages,
            currents_ma=self.currents_ma,
            rssi_dbm=RSSI_DBM,
            uptime_ms=(uptime_ms + 2**31) % _INT32 - 2**31,  # int32 on the wire, wraps like it
            cp_adc=_CP_ADC.get(pilot, 0),
            pp_adc=_PP_ADC.get(self._proximity, 0),
            log_lines=tuple(self._log_lines),
        )
        self._log_lines.clear()
        self._log_bytes = 0
        return data

    def _on_request(self, request: Request) -> None:
        self._received.append(request)
        self._arm_safety()
        if self._silent:
            logger.debug("%s: silent, ignoring %s", self.name, request.type.name)
            self._touch()
            return
        before = self._observe()
        if request.type is RequestType.PING:
            self._send(Response(request))
        elif request.type is RequestType.COLLECT_DATA:
            self._send(Response(request, self._data()))
        elif request.type is RequestType.SET_PWM:
            assert request.pwm is not None
            self._set_pwm(request.pwm)
            self._send(Response(request))
        elif request.type is RequestType.SET_CONTACTOR:
            assert request.contactor is not None
            self._set_contactor(request.contactor)
            self._send(Response(request))
        elif request.type is RequestType.FIRMWARE_UPLOAD:
            # The real firmware never answers an upload; it flashes a good image and restarts.
            image = request.image or b""
            self._log(f"firmware upload {len(image)} bytes crc {'ok' if request.crc_ok else 'bad'}")
            logger.info("%s: firmware upload of %d bytes (not answered)", self.name, len(image))
            if request.crc_ok and image:
                self._uploads.append(image)
                self._rebooting = self._firmware_update != "ignore"
        self._after(before, by_command=True)

    async def _run(self) -> None:
        host, port = self._bridge
        while True:
            try:
                async with asyncio.timeout(self._request_timeout):
                    local = (self._source, 0) if self._source else None
                    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
            except OSError as err:  # includes TimeoutError
                logger.info(
                    "%s: cannot connect to %s:%s: %s", self.name, host, port, str(err) or "timeout"
                )
            else:
                try:
                    await self._serve(reader, writer)
                except ProtocolError as err:
                    logger.warning(
                        "%s: malformed request, dropping the connection: %s", self.name, err
                    )
                except (OSError, EOFError) as err:
                    logger.info("%s: connection lost: %s", self.name, err)
                finally:
                    self._peer = None
                    if self._connected:
                        self._connected = False
                        self._touch()
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            if self._rebooting:
                if self._firmware_update == "die":
                    logger.info("%s: does not come back after the firmware upload", self.name)
                    return
                self._reboot()
            await asyncio.sleep(self._reconnect_delay)

    def _reboot(self) -> None:
        """Start again after a firmware update: outputs off, uptime from 0, maybe a new version."""
        self._rebooting = False
        before = self._observe()
        self._set_contactor(False)
        self._set_pwm(100)
        self._log_lines.clear()
        self._log_bytes = 0
        self._started_at = asyncio.get_running_loop().time()
        if self._firmware_after_update is not None:
            self._firmware = self._firmware_after_update
        logger.info("%s: restarted with firmware %d", self.name, self._firmware)
        self._after(before, by_command=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handshake, then answer requests until the connection drops or falls idle."""
        loop = asyncio.get_running_loop()
        connection = Connection(Role.STATION)
        writer.write(connection.send(protocol.Handshake(self._serial, self._firmware)))
        await writer.drain()
        self._peer = (connection, writer)
        self._connected = True
        self._connections += 1
        host, port = self._bridge
        logger.info("%s: connected to %s:%s", self.name, host, port)
        self._log(f"connected to {host}:{port}")
        self._touch()
        last_request = loop.time()
        while True:
            try:
                async with asyncio.timeout_at(last_request + self._request_timeout):
                    request = await _next_request(connection, reader)
            except TimeoutError:
                logger.info(
                    "%s: no request for %s s, dropping the connection",
                    self.name,
                    self._request_timeout,
                )
                self._log("request timeout")
                return
            last_request = loop.time()
            self._on_request(request)
            await writer.drain()
            if self._rebooting:
                return


async def _next_request(connection: Connection, reader: asyncio.StreamReader) -> Request:
    """The bridge's next request; EOFError once it closed the connection."""
    while (event := connection.next_event()) is NEED_DATA:
        data = await reader.read(READ_SIZE)
        if not data:
            raise EOFError("closed by the bridge")
        connection.receive_data(data)
    assert isinstance(event, Request)  # all a station receives
    return event


async def run_simulators(
    bridge: tuple[str, int],
    *,
    count: int = 1,
    serial: str | None = None,
    firmware: int = 4,
    vehicle: VehicleConfig | None = None,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """Run ``count`` virtual stations against ``bridge`` until ``stop`` is set (or forever).

    With ``serial`` (only for ``count == 1``) the station uses it; otherwise the stations get
    ``virtual_serial(1..count)``. ``options`` go to every :class:`VirtualStation`. All stations
    are stopped on the way out, also on cancellation.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if serial is not None and count != 1:
        raise ValueError("a fixed serial needs count == 1")
    serials = [serial] if serial is not None else [virtual_serial(i) for i in range(1, count + 1)]
    stations = [
        VirtualStation(
            s, firmware=firmware, bridge=bridge, vehicle=vehicle, name=f"sim{i}", **options
        )
        for i, s in enumerate(serials, start=1)
    ]
    try:
        for station in stations:
            await station.start()
        await (stop or asyncio.Event()).wait()
    finally:
        for station in stations:
            await station.stop()
