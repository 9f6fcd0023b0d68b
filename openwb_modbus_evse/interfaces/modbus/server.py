"""Modbus TCP server: every charge point as an openWB series2 LP block.

Built on pymodbus' device API (``SimDevice``/``SimData`` with an async ``action``). The device's
register array is only a buffer: every read fills the requested LP blocks from the live charge
points, and every write is validated as a whole, then handed to the charge points (never stored).

Each client connection is a :class:`_Connection` (pymodbus' request handler, subclassed): it is
admitted by the listener's :class:`~openwb_modbus_evse.limits.ConnectionLimiter`, closed after
``idle_timeout`` without a request, may write only from an address in ``write_allow``, and is
dropped when its MBAP header is malformed (a stream that lost its framing cannot be resynced).
A connection is half-open until its first request; from then on, one of a controller (an address
that has written successfully, or one in ``keep``) keeps its place when the listener is full.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.exceptionresponse import ExceptionResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
)
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from ... import chargepoint as cp
from ...config import LPS_PER_UNIT, MAX_LP
from ...control import MODBUS, Command, Control, Kind
from ...limits import LOG_INTERVAL, ConnectionLimiter, Network, Slot, address_in, host_of
from ...ratelimit import RateLimit
from .registers import (
    LP_BASE,
    LP_STRIDE,
    REGISTER_MAP,
    BlockEncoder,
    RegisterMap,
    lp_base,
    signed16,
)

log = logging.getLogger(__name__)

READ_CODES = (3, 4)  # openWB answers both with the same values
WRITE_CODES = (6, 16)
FIRST_ADDRESS = LP_BASE + LP_STRIDE  # LP1
ADDRESS_COUNT = LP_STRIDE * LPS_PER_UNIT  # one unit ID's blocks: LP1..LP9 of its group
UNIT_GROUPS = -(-MAX_LP // LPS_PER_UNIT)  # unit IDs needed for every LP
LAST_UNIT_ID = 247  # the highest unit ID Modbus allows

_REFUSAL_CODES = {
    cp.RefusalKind.BAD_VALUE: ExcCodes.ILLEGAL_VALUE,
    cp.RefusalKind.BUSY: ExcCodes.DEVICE_BUSY,
    # We are a gateway to the station; it cannot be reached.
    cp.RefusalKind.OFFLINE: ExcCodes.GATEWAY_NO_RESPONSE,
    # Another interface controls this LP: the spec's "wrong state to process a request of this
    # type" is exception 1.
    cp.RefusalKind.NOT_CONTROLLER: ExcCodes.ILLEGAL_FUNCTION,
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise cp.Refused(cp.RefusalKind.BAD_VALUE, message)


def _only_one(value: int) -> None:
    _require(value == 1, f"only 1 is accepted, got {value}")


def _trigger(value: int) -> Command:
    _require(value == 1, f"the phase-switch trigger takes 1, got {value}")
    return Command(Kind.PHASE_SWITCH)


def _heartbeat(value: int) -> Command:
    _require(value in (0, 1), f"heartbeat enforcement takes 0 or 1, got {value}")
    return Command(Kind.HEARTBEAT_ENFORCED, value == 1)


#: The command a write to each writable register of register_map.csv is (None: accepted, nothing
#: to do). Names missing here (force_update: openWB Pro only) are refused with exception 2.
WRITE_COMMANDS: dict[str, Callable[[int], Command | None]] = {
    "set_current": lambda value: Command(Kind.CURRENT, value),
    "phase_target": lambda value: Command(Kind.PHASES, value),
    "phase_switch_trigger": _trigger,
    "heartbeat": _heartbeat,
    "reset_rfid": _only_one,  # no RFID reader: nothing to reset
    "cp_interruption": lambda value: Command(Kind.CP_INTERRUPTION, value),
}


class _Refused(ModbusPDU):
    """A request answered with an exception without touching the registers."""

    def __init__(self, function_code: int, exception_code: ExcCodes) -> None:
        super().__init__()
        self.function_code, self.exception_code = function_code, exception_code

    async def datastore_update(self, context: object, device_id: int) -> ModbusPDU:
        return ExceptionResponse(self.function_code, self.exception_code)


class _UnsupportedFunction(ModbusPDU):
    """A request with a function code an openWB does not answer."""

    async def datastore_update(self, context: object, device_id: int) -> ModbusPDU:
        return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)


class _ReadResponse(ReadInputRegistersResponse):
    """A read response encoded in one struct call (pymodbus packs register by register)."""

    def encode(self) -> bytes:
        count = len(self.registers)
        return struct.pack(f">B{count}H", 2 * count, *self.registers)


class _ReadRequest(ReadInputRegistersRequest):
    """FC 3 and 4: answered with :class:`_ReadResponse` (the same bytes as pymodbus' own)."""

    async def datastore_update(self, context: object, device_id: int) -> ModbusPDU:
        values = await context.async_getValues(  # type: ignore[attr-defined]
            device_id, self.function_code, self.address, self.count
        )
        if isinstance(values, ExcCodes):
            return ExceptionResponse(self.function_code, values)
        response = _ReadResponse(registers=values)
        response.function_code = self.function_code
        return response


class _ReadHolding(_ReadRequest):
    function_code = 3


class _ReadInput(_ReadRequest):
    function_code = 4


# pymodbus also serves coils, diagnostics, device identification...; an openWB answers none of
# them. Every other function code decodes to a request answered with exception 1 (refusing to
# decode it would make pymodbus answer with function code 0, which clients cannot match).
_DECODER_TABLE: dict[int, tuple[type[ModbusPDU], type[ModbusPDU]]] = {
    3: (_ReadHolding, ReadHoldingRegistersResponse),
    4: (_ReadInput, ReadInputRegistersResponse),
    **{fc: DecodePDU.pdu_table[fc] for fc in WRITE_CODES},
}
for _fc in range(1, 0x80):
    if _fc not in _DECODER_TABLE:
        _cls = type(f"UnsupportedFunction{_fc}", (_UnsupportedFunction,), {"function_code": _fc})
        _DECODER_TABLE[_fc] = (_cls, _cls)


class _Decoder(DecodePDU):
    """Every request decodes to something that answers with the request's function code.

    pymodbus gives up (and answers ``80 01``, function code 0) on a count out of range or a
    truncated request: those get exception 3 (illegal data value: the request's structure is
    wrong), and function codes 0x80 and above, which no request may use, exception 1.
    """

    pdu_table = _DECODER_TABLE

    def __init__(self) -> None:
        super().__init__(is_server=True)

    def decode(self, frame: bytes) -> ModbusPDU | None:
        function_code = frame[0]
        if function_code >= 0x80:
            return _Refused(function_code, ExcCodes.ILLEGAL_FUNCTION)
        pdu = super().decode(frame)
        return pdu if pdu is not None else _Refused(function_code, ExcCodes.ILLEGAL_VALUE)


class BadFrame(Exception):
    """An MBAP header no Modbus TCP client sends: the connection is dropped."""


# MBAP length = unit ID + PDU; a PDU is 1..253 bytes (Modbus Application Protocol 1.1b3, 4.1).
_MBAP_LENGTH = range(2, 255)
MAX_FRAME = 6 + 254  # MBAP header (without the unit ID) + the largest length
# Requests of one client answered at a time; the rest wait unread in the kernel, so a client that
# pipelines thousands cannot make us hold thousands of tasks or answers.
MAX_PENDING = 16


class _Framer(FramerSocket):
    """MBAP framing that rejects a protocol ID other than 0 and a length outside 2..254.

    pymodbus waits for more data on such a header, for ever; there is no way to find the next
    frame in the stream after it, so the connection is dropped instead.
    """

    def decode(self, data: bytes) -> tuple[int, int, int, bytes]:
        if len(data) >= 6:
            _, protocol, length = struct.unpack_from(">HHH", data)
            if protocol or length not in _MBAP_LENGTH:
                raise BadFrame(f"protocol ID {protocol}, length {length}")
        return super().decode(data)


class ModbusObserver:
    """Receives every response the server sends (for the heartbeat and for metrics)."""

    def response(
        self, function_code: int, exception_code: int | None, controller: bool, host: str
    ) -> None:
        """A request from ``host`` was answered; ``exception_code`` None means success.

        ``controller`` is true if the client may write (only a controller keeps the heartbeat).
        """


class _Connection(ServerRequestHandler):
    """One client: admitted by the limiter, closed when idle, read-only unless allowed to write."""

    server: _Server

    def __init__(self, owner: _Server) -> None:
        super().__init__(owner, None, None, None)
        self.host = "?"
        self.may_write = False
        self._slot: Slot | None = None  # admitted: its place in the limiter
        self._last_request = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._pending = 0  # requests taken but not yet answered
        self._write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self.server
        self.host = host_of(transport.get_extra_info("peername"))
        self._slot = owner.limiter.admit(self.host, transport.abort)
        if self._slot is None:
            if self.listener is not None:
                self.listener.active_connections.pop(self.unique_id, None)
            transport.abort()
            return
        self.may_write = owner.write_allow is None or address_in(self.host, owner.write_allow)
        self._last_request = self.loop.time()
        if owner.idle_timeout is not None:
            self._idle_timer = self.loop.call_later(owner.idle_timeout, self._check_idle)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()
            self._slot = None
            if self._idle_timer is not None:
                self._idle_timer.cancel()
        super().connection_lost(exc)

    # A client that sends requests but does not read the responses: stop reading its requests
    # while the responses pile up beyond the transport's high-water mark (64 KiB), so that it
    # cannot grow our memory.
    def pause_writing(self) -> None:
        self._write_paused = True
        self._read_as_allowed()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._take_requests()  # those that waited in the buffer
        self._read_as_allowed()

    def _read_as_allowed(self) -> None:
        """Read while the responses flow and few requests wait for their answer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._write_paused or self._pending >= MAX_PENDING:
            transport.pause_reading()  # type: ignore[attr-defined]
        else:
            transport.resume_reading()  # type: ignore[attr-defined]

    def _check_idle(self) -> None:
        idle = self.loop.time() - self._last_request
        timeout = self.server.idle_timeout
        assert timeout is not None
        if idle < timeout:
            self._idle_timer = self.loop.call_later(timeout - idle, self._check_idle)
            return
        log.info("Modbus client %s: closing the connection, idle for %.0f s", self.host, idle)
        self.close()

    def datagram_received(self, data: bytes, addr: tuple | None = None) -> None:
        """Bytes from the client (pymodbus' entry point for TCP too).

        pymodbus drops a receive buffer over 516 bytes without a word: 43 pipelined reads in one
        segment would go unanswered, and garbage would neither be answered nor close the
        connection. Here every complete request is answered, and what is left after them must
        be the start of one request (an MBAP frame has at most 260 bytes), else the stream has
        lost its framing and the connection is dropped.
        """
        self.recv_buffer += data
        self._take_requests()

    def _take_requests(self) -> None:
        used = self.callback_data(self.recv_buffer)
        self.recv_buffer = self.recv_buffer[used:]
        if self._pending >= MAX_PENDING or self._write_paused:
            self._read_as_allowed()  # the rest waits, unread, until answers went out
        elif len(self.recv_buffer) > MAX_FRAME and self.transport is not None:
            self.server.bad_frame(self.host, f"{len(self.recv_buffer)} bytes without a frame")
            self.transport.abort()

    def _answered(self, _: object) -> None:
        self._pending -= 1
        if self._pending == MAX_PENDING - 1 and self.transport is not None:
            self._take_requests()  # requests that arrived meanwhile
            self._read_as_allowed()

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        """Decode the complete requests in ``data`` and answer each; returns the bytes used.

        Replaces pymodbus' way, which answers one request per call, through another thread's
        entry point (``run_coroutine_threadsafe``).
        """
        self._last_request = self.loop.time()
        if self._slot is not None:
            self._slot.touch()
        used = 0
        while used < len(data) and self._pending < MAX_PENDING and not self._write_paused:
            try:
                n, pdu = self.framer.handleFrame(data[used:], 0, 0)
            except BadFrame as err:
                self.server.bad_frame(self.host, str(err))
                self.transport.abort()
                return len(data)
            if pdu is None:
                break
            used += n
            if self._slot is not None and not self._slot.established:
                self._established(self._slot)
            self._pending += 1
            self.loop.create_task(self._answer(pdu)).add_done_callback(self._answered)
        return used

    def _established(self, slot: Slot) -> None:
        """The first request: past the handshake; a controller's connection keeps its place."""
        slot.establish()
        owner = self.server
        if self.host in owner.writers or (
            owner.keep is not None and address_in(self.host, owner.keep)
        ):
            slot.protect()

    async def _answer(self, request: ModbusPDU) -> None:
        if request.function_code in WRITE_CODES and not self.may_write:
            # Not permitted for this client: exception 1, as a device answers a function it
            # does not offer in its current configuration; the registers are not touched.
            response: ModbusPDU = ExceptionResponse(request.function_code, WRITE_DENIED)
        else:
            try:
                response = await request.datastore_update(self.server.context, request.dev_id)
            except Exception:  # a bug costs this request an exception 4, and is logged
                log.exception("Modbus request %s failed", request)
                response = ExceptionResponse(request.function_code, ExcCodes.DEVICE_FAILURE)
        response.transaction_id = request.transaction_id
        response.dev_id = request.dev_id
        code = response.exception_code if isinstance(response, ExceptionResponse) else None
        if code is None and response.function_code in WRITE_CODES:
            self.server.wrote(self.host)
            if self._slot is not None:
                self._slot.protect()  # a controller: a flood must not close its connection
        observer = self.server.observer
        observer.response(response.function_code & 0x7F, code, self.may_write, self.host)
        if self.transport is not None:
            # Not pymodbus' send(), which drops a request received meanwhile (a client's
            # habit: it clears its receive buffer before a request).
            self.transport.write(self.framer.buildFrame(response))  # type: ignore[attr-defined]


#: Addresses that have written, remembered so that their new connections keep their place.
WRITERS_KEPT = 16

#: The exception a client gets for a write from an address not in ``modbus_write_allow``.
WRITE_DENIED = ExcCodes.ILLEGAL_FUNCTION


Reader = Callable[[int, int, int], "list[int] | ExcCodes"]


class _Context:
    """pymodbus' device store (``SimCore``), with register reads served by ``read`` directly.

    Reads are nine in ten requests; the device store would check every register's flags and
    copy the block through its buffer for each. Writes (and their echo) go through the store
    and the device's ``action`` as before.
    """

    def __init__(self, core: SimCore, read: Reader) -> None:
        self._core, self._read = core, read

    def device_ids(self) -> list[int]:
        return self._core.device_ids()

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        if func_code in READ_CODES:
            return self._read(device_id, address, count)
        return await self._core.async_getValues(device_id, func_code, address, count)

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        return await self._core.async_setValues(device_id, func_code, address, values)


class _Server(ModbusTcpServer):
    """pymodbus' TCP server with our connections, decoder and framer."""

    def __init__(
        self,
        devices: list[SimDevice],
        address: tuple[str, int],
        *,
        limiter: ConnectionLimiter,
        write_allow: tuple[Network, ...] | None,
        keep: tuple[Network, ...] | None,
        idle_timeout: float | None,
        observer: ModbusObserver,
        read: Reader,
    ) -> None:
        super().__init__(devices, address=address)
        assert isinstance(self.context, SimCore)
        self.context = _Context(self.context, read)  # type: ignore[assignment]
        self.decoder = _Decoder()
        self.framer = _Framer  # type: ignore[assignment]
        self.limiter = limiter
        self.write_allow = write_allow
        self.keep = keep
        # Addresses that have written successfully, the latest last (bounded: the oldest go).
        self.writers: OrderedDict[str, None] = OrderedDict()
        self.idle_timeout = idle_timeout
        self.observer = observer
        self._bad_frame_log = RateLimit(1 / LOG_INTERVAL, burst=1, kind="modbus_bad_frame")

    def callback_new_connection(self) -> _Connection:
        return _Connection(self)

    def wrote(self, host: str) -> None:
        """``host`` has written successfully: its later connections keep their place too."""
        self.writers[host] = None
        self.writers.move_to_end(host)
        if len(self.writers) > WRITERS_KEPT:
            self.writers.popitem(last=False)

    def bad_frame(self, host: str, what: str) -> None:
        """Log a dropped connection, rate-limited."""
        if self._bad_frame_log.allow(self.loop.time()):
            log.warning(
                "Modbus client %s: malformed MBAP header (%s), connection dropped%s",
                host,
                what,
                self._bad_frame_log.left_out(),
            )


class ChargePointServer:
    """Serves the charge point of LP n over Modbus TCP: at unit ``unit_id + (n - 1) // 9``, in
    the block at 10000 + 100 ((n - 1) % 9 + 1) (LP10 is served as LP1 of the next unit ID)."""

    def __init__(
        self,
        charge_point: Callable[[int], cp.ChargePoint | None],
        clock: Callable[[], float],
        control: Control,
        *,
        unit_id: int = 1,
        observer: ModbusObserver | None = None,
        limiter: ConnectionLimiter | None = None,
        write_allow: tuple[Network, ...] | None = None,
        keep: tuple[Network, ...] | None = None,
        idle_timeout: float | None = None,
        regmap: RegisterMap = REGISTER_MAP,
    ) -> None:
        self._charge_point = charge_point
        self._control = control
        self._blocks = BlockEncoder(regmap)
        self._clock = clock
        self.unit_id = unit_id
        self._observer = observer or ModbusObserver()
        self.limiter = limiter or ConnectionLimiter.unbounded("modbus")
        self._write_allow = write_allow
        self._keep = keep  # whose connections keep their place (None: only those that wrote)
        self._idle_timeout = idle_timeout
        self._regmap = regmap
        self._server: _Server | None = None
        self.port = 0

    def units(self) -> range:
        """The unit IDs that serve LPs: ``unit_id`` for LP1..9, the next for LP10..18, ...

        With ``unit_id`` 0 only LP1..9 are served, on every unit ID.
        """
        if self.unit_id == 0:
            return range(0, 1)
        return range(self.unit_id, min(self.unit_id + UNIT_GROUPS, LAST_UNIT_ID + 1))

    def devices(self) -> list[SimDevice]:
        """The pymodbus devices: one per unit ID that serves LPs, and (unless unit ID 0 = any)
        one that answers the rest."""
        devices = []
        for group, unit in enumerate(self.units()):
            block = SimData(address=FIRST_ADDRESS, count=ADDRESS_COUNT, datatype=DataType.REGISTERS)
            devices.append(SimDevice(id=unit, simdata=[block], action=self._action_for(group)))
        if self.unit_id == 0:
            return devices
        everything = SimData(address=0, count=0xFFFF, datatype=DataType.REGISTERS)
        return [*devices, SimDevice(id=0, simdata=[everything], action=_no_such_unit)]

    def _action_for(self, group: int) -> Callable[..., Awaitable[ExcCodes | None]]:
        async def action(*args: Any) -> ExcCodes | None:
            return await self.action(*args, group=group)

        return action

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, readable from ``self.port``)."""
        server = _Server(
            self.devices(),
            (host, port),
            limiter=self.limiter,
            write_allow=self._write_allow,
            keep=self._keep,
            idle_timeout=self._idle_timeout,
            observer=self._observer,
            read=self.read,
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as err:  # pymodbus' way of saying the bind failed
            raise OSError(f"cannot listen for Modbus on {host}:{port}: address in use?") from err
        self._server = server
        assert server.transport is not None
        self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        units = self.units()
        log.info(
            "Modbus server listening on %s:%d, unit ID %s",
            host,
            self.port,
            units[0] if len(units) == 1 else f"{units[0]}..{units[-1]}",
        )

    async def stop(self) -> None:
        """Stop listening and drop the clients."""
        if self._server is not None:
            with suppress(Exception):
                await self._server.shutdown()
            self._server = None

    def read(self, device_id: int, address: int, count: int) -> list[int] | ExcCodes:
        """Registers ``address`` .. ``address + count - 1`` of unit ``device_id`` (FC 3 and 4)."""
        group = self._group(device_id)
        if group is None:
            return ExcCodes.GATEWAY_NO_RESPONSE
        if address < FIRST_ADDRESS or address + count > FIRST_ADDRESS + ADDRESS_COUNT:
            return ExcCodes.ILLEGAL_ADDRESS
        first, last = (address - LP_BASE) // LP_STRIDE, (address + count - 1 - LP_BASE) // LP_STRIDE
        now = self._clock()
        blocks: list[int] = []
        for lp in range(first, last + 1):
            point = self._charge_point(group * LPS_PER_UNIT + lp)
            if point is None:
                return self._missing(group)
            block = self._blocks.block(point, now)
            if first == last and count == LP_STRIDE:
                return block  # the usual whole-block read: no copy
            blocks += block
        offset = address - lp_base(first)
        return blocks[offset : offset + count]

    def _missing(self, group: int) -> ExcCodes:
        """The answer for an LP that is not there: exception 2, or 11 if the whole unit ID has
        none (a unit ID beyond the last station is as absent as any unknown one)."""
        first = group * LPS_PER_UNIT
        if group and all(self._charge_point(first + n) is None for n in range(1, LPS_PER_UNIT + 1)):
            return ExcCodes.GATEWAY_NO_RESPONSE
        return ExcCodes.ILLEGAL_ADDRESS

    def _group(self, device_id: int) -> int | None:
        """Which nine LPs unit ``device_id`` serves (0: LP1..9, 1: LP10..18, ...), if any."""
        if self.unit_id == 0:
            return 0
        group = device_id - self.unit_id
        return group if 0 <= group < len(self.units()) else None

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
        *,
        group: int = 0,
    ) -> ExcCodes | None:
        """pymodbus calls this before every write to our registers (FC 6 and 16) of the unit
        ID that serves LP group ``group`` (0: LP1..9, 1: LP10..18, ...)."""
        if set_values is None:
            return None  # pymodbus reads back a single write for its echo: the written value
        first = group * LPS_PER_UNIT
        lps = range(
            (address - LP_BASE) // LP_STRIDE, (address + count - 1 - LP_BASE) // LP_STRIDE + 1
        )
        if any(self._charge_point(first + lp) is None for lp in lps):
            return self._missing(group)
        return self._write(first, address, [int(v) for v in set_values])

    def _write(self, first: int, address: int, words: list[int]) -> ExcCodes | None:
        orders: list[tuple[cp.ChargePoint, Command]] = []
        try:
            for i, word in enumerate(words):
                block, offset = divmod(address + i - LP_BASE, LP_STRIDE)
                lp = first + block
                point = self._charge_point(lp)
                assert point is not None
                reg = self._regmap.writable_at(offset)
                value = signed16(word)
                translate = WRITE_COMMANDS.get(reg.name) if reg is not None else None
                if translate is None:
                    self._control.refused(
                        MODBUS,
                        "not_writable",
                        f"LP{lp}: write of {value} to address {address + i} refused: not writable",
                    )
                    return ExcCodes.ILLEGAL_ADDRESS
                try:
                    command = translate(value)
                except cp.Refused as refusal:
                    text = f"LP{lp}: write of {value} to {reg.name} refused: {refusal}"
                    self._control.refused(MODBUS, refusal.kind.value, text)
                    raise
                if command is not None:
                    orders.append((point, command))
            # Every part is checked before anything changes.
            self._control.execute(MODBUS, orders)
        except cp.Refused as refusal:
            return _REFUSAL_CODES[refusal.kind]
        return None


async def _no_such_unit(*_: object) -> ExcCodes:
    """The action of the device that stands for every other unit ID."""
    return ExcCodes.GATEWAY_NO_RESPONSE
