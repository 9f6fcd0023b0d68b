"""Modbus TCP server: every charge point as an openWB series2 LP block.

Built on pymodbus' device API (``SimDevice``/``SimData`` with an async ``action``). The device's
register array is only a buffer: every read fills the requested LP blocks from the live charge
points, and every write is validated as a whole, then handed to the charge points (never stored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress

from pymodbus.constants import ExcCodes
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.exceptionresponse import ExceptionResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .. import chargepoint as cp
from .registers import (
    LP_BASE,
    LP_STRIDE,
    MAX_LP,
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
ADDRESS_COUNT = LP_STRIDE * MAX_LP

_REFUSAL_CODES = {
    cp.RefusalKind.BAD_VALUE: ExcCodes.ILLEGAL_VALUE,
    cp.RefusalKind.BUSY: ExcCodes.DEVICE_BUSY,
    # We are a gateway to the station; it cannot be reached.
    cp.RefusalKind.OFFLINE: ExcCodes.GATEWAY_NO_RESPONSE,
}


class NotWritable(Exception):
    """A write to an address that takes no writes."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise cp.Refused(cp.RefusalKind.BAD_VALUE, message)


def _accept_only_one(state: cp.State, value: int, now: float) -> cp.State:
    _require(value == 1, f"only 1 is accepted, got {value}")
    return state


def _trigger(state: cp.State, value: int, now: float) -> cp.State:
    _require(value == 1, f"the phase-switch trigger takes 1, got {value}")
    return cp.trigger_phase_switch(state, now)


def _heartbeat(state: cp.State, value: int, now: float) -> cp.State:
    _require(value in (0, 1), f"heartbeat enforcement takes 0 or 1, got {value}")
    return cp.set_heartbeat_enforced(state, value == 1, now)


#: What a write to each writable register of register_map.csv does to the charge point state.
#: Names missing here (force_update: openWB Pro only) are refused with exception 2.
WRITE_HANDLERS: dict[str, Callable[[cp.State, int, float], cp.State]] = {
    "set_current": cp.set_current,
    "phase_target": cp.set_phase_target,
    "phase_switch_trigger": _trigger,
    "heartbeat": _heartbeat,
    "reset_rfid": _accept_only_one,  # no RFID reader: nothing to reset
    "cp_interruption": cp.start_cp_interruption,
}


class _UnsupportedFunction(ModbusPDU):
    """A request with a function code an openWB does not answer."""

    async def datastore_update(self, context: object, device_id: int) -> ModbusPDU:
        return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_FUNCTION)


# pymodbus also serves coils, diagnostics, device identification...; an openWB answers none of
# them. Every other function code decodes to a request answered with exception 1 (refusing to
# decode it would make pymodbus answer with function code 0, which clients cannot match).
_DECODER_TABLE = {fc: DecodePDU.pdu_table[fc] for fc in (*READ_CODES, *WRITE_CODES)}
for _fc in range(1, 0x80):
    if _fc not in _DECODER_TABLE:
        _cls = type(f"UnsupportedFunction{_fc}", (_UnsupportedFunction,), {"function_code": _fc})
        _DECODER_TABLE[_fc] = (_cls, _cls)


class ModbusObserver:
    """Receives every response the server sends (for the heartbeat and for metrics)."""

    def response(self, function_code: int, exception_code: int | None) -> None:
        """A request was answered; ``exception_code`` None means success."""


class ChargePointServer:
    """Serves the charge point of LP n at 10000 + 100 n over Modbus TCP."""

    def __init__(
        self,
        charge_point: Callable[[int], cp.ChargePoint | None],
        clock: Callable[[], float],
        *,
        unit_id: int = 1,
        observer: ModbusObserver | None = None,
        regmap: RegisterMap = REGISTER_MAP,
    ) -> None:
        self._charge_point = charge_point
        self._blocks = BlockEncoder(regmap)
        self._clock = clock
        self.unit_id = unit_id
        self._observer = observer or ModbusObserver()
        self._regmap = regmap
        self._server: ModbusTcpServer | None = None
        self.port = 0

    def devices(self) -> list[SimDevice]:
        """The pymodbus devices: ours, and (unless unit ID 0 = any) one that answers the rest."""
        block = SimData(address=FIRST_ADDRESS, count=ADDRESS_COUNT, datatype=DataType.REGISTERS)
        ours = SimDevice(id=self.unit_id, simdata=[block], action=self.action)
        if self.unit_id == 0:
            return [ours]
        everything = SimData(address=0, count=0xFFFF, datatype=DataType.REGISTERS)
        return [ours, SimDevice(id=0, simdata=[everything], action=_no_such_unit)]

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one, readable from ``self.port``)."""
        server = ModbusTcpServer(self.devices(), address=(host, port), trace_pdu=self._trace_pdu)
        server.decoder.pdu_table = _DECODER_TABLE
        try:
            await server.serve_forever(background=True)
        except RuntimeError as err:  # pymodbus' way of saying the bind failed
            raise OSError(f"cannot listen for Modbus on {host}:{port}: address in use?") from err
        self._server = server
        assert server.transport is not None
        self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("Modbus server listening on %s:%d, unit ID %d", host, self.port, self.unit_id)

    async def stop(self) -> None:
        """Stop listening and drop the clients."""
        if self._server is not None:
            with suppress(Exception):
                await self._server.shutdown()
            self._server = None

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            if isinstance(pdu, ExceptionResponse):
                self._observer.response(pdu.function_code & 0x7F, pdu.exception_code)
            else:
                self._observer.response(pdu.function_code, None)
        return pdu

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this before every access to our registers (FC 3, 4, 6, 16 only)."""
        lps = range(
            (address - LP_BASE) // LP_STRIDE, (address + count - 1 - LP_BASE) // LP_STRIDE + 1
        )
        points = {lp: self._charge_point(lp) for lp in lps}
        if any(point is None for point in points.values()):
            return ExcCodes.ILLEGAL_ADDRESS
        now = self._clock()
        if set_values is None:
            if function_code in READ_CODES:
                for lp, point in points.items():
                    assert point is not None
                    offset = lp_base(lp) - start_address
                    registers[offset : offset + LP_STRIDE] = self._blocks.block(point, now)
            # else: pymodbus reads back a single write for its echo; leave the written value.
            return None
        return self._write(address, [int(v) for v in set_values], now)

    def _write(self, address: int, words: list[int], now: float) -> ExcCodes | None:
        staged: dict[int, tuple[cp.ChargePoint, cp.State]] = {}
        for i, word in enumerate(words):
            lp, offset = divmod(address + i - LP_BASE, LP_STRIDE)
            point = self._charge_point(lp)
            assert point is not None
            reg = self._regmap.writable_at(offset)
            value = signed16(word)
            handler = WRITE_HANDLERS.get(reg.name) if reg is not None else None
            if handler is None:
                log.warning(
                    "LP%d: write of %d to address %d refused: not writable", lp, value, address + i
                )
                return ExcCodes.ILLEGAL_ADDRESS
            state = staged.get(lp, (point, point.state))[1]
            try:
                staged[lp] = (point, handler(state, value, now))
            except cp.Refused as refusal:
                log.warning(
                    "LP%d: write of %d to %s (%d) refused: %s",
                    lp,
                    value,
                    reg.name,
                    address + i,
                    refusal,
                )
                return _REFUSAL_CODES[refusal.kind]
        # Every part was valid: only now does anything change.
        for point, state in staged.values():
            _log_changes(point, state)
            point.commit(state)
        return None


def _log_changes(point: cp.ChargePoint, new: cp.State) -> None:
    old, lp = point.state, point.identity.lp
    if new.requested_ca != old.requested_ca:
        log.info("LP%d: charging current set to %.2f A", lp, new.requested_ca / 100)
    if new.enforce_heartbeat != old.enforce_heartbeat:
        log.info("LP%d: heartbeat enforcement %s", lp, "on" if new.enforce_heartbeat else "off")
    if new.sequence is not None and new.sequence != old.sequence:
        seq = new.sequence
        what = (
            f"phase switch to {seq.phases} phase(s)"
            if seq.phases is not None
            else f"control-pilot interruption for {seq.seconds} s"
        )
        log.info("LP%d: %s started", lp, what)


async def _no_such_unit(*_: object) -> ExcCodes:
    """The action of the device that stands for every other unit ID."""
    return ExcCodes.GATEWAY_NO_RESPONSE
