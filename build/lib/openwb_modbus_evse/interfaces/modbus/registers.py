"""The openWB Rev2.0 register layout, read from register_map.csv (its single source of truth).

Turns a charge point's values into the 100 registers of its LP block, and a write request into
named values. Nothing outside this module knows a register offset.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from ...chargepoint import Identity, State
from ...view import Freshness, Shown, Viewable, freshness, show

LP_BASE = 10000  # LP n occupies LP_BASE + LP_STRIDE * n ... + LP_STRIDE - 1
LP_STRIDE = 100
_SIZES = {"int16": 1, "int32": 2, "string": 10}  # a string holds 20 characters, 2 per register
INVALID = -1  # what openWB serves for "no valid value"
SERIES2 = 1  # type of hardware

Value = int | float | str | None  # None: invalid, served as -1


@dataclass(frozen=True)
class Register:
    """One row of register_map.csv."""

    offset: int
    name: str
    type: str
    access: str
    scale: int | None
    unit: str
    description: str

    @property
    def size(self) -> int:
        """Number of 16-bit registers."""
        return _SIZES[self.type]

    @property
    def writable(self) -> bool:
        """Controllers write it (and cannot read it back)."""
        return self.access == "W"


class RegisterMap:
    """All registers of one LP block, by offset and by name."""

    def __init__(self, registers: tuple[Register, ...]) -> None:
        used: set[int] = set()
        for reg in registers:
            span = set(range(reg.offset, reg.offset + reg.size))
            if span & used or reg.offset + reg.size > LP_STRIDE:
                raise ValueError(f"register {reg.name} (offset {reg.offset}) overlaps or overflows")
            used |= span
        self.registers = registers
        self.readable = tuple(r for r in registers if not r.writable)
        self._by_name = {r.name: r for r in registers}
        self._writable = {r.offset: r for r in registers if r.writable}

    def __getitem__(self, name: str) -> Register:
        return self._by_name[name]

    def writable_at(self, offset: int) -> Register | None:
        """The writable register at this offset, if any."""
        return self._writable.get(offset)

    def address(self, lp: int, name: str) -> int:
        """Modbus address of a register of LP ``lp`` (for clients and docs)."""
        return lp_base(lp) + self[name].offset

    def encode(self, values: Mapping[str, Value]) -> list[int]:
        """The 100 registers of one LP block; 0 where nothing is defined or readable."""
        block = [0] * LP_STRIDE
        for reg in self.readable:
            block[reg.offset : reg.offset + reg.size] = encode_value(reg, values.get(reg.name, 0))
        return block

    def decode(self, registers: list[int]) -> dict[str, Value]:
        """Named values from the registers of a whole LP block (what a client does)."""
        return {
            reg.name: decode_value(reg, registers[reg.offset : reg.offset + reg.size])
            for reg in self.readable
        }


def lp_base(lp: int) -> int:
    """First address of LP ``lp``'s block."""
    return LP_BASE + LP_STRIDE * lp


def encode_value(reg: Register, value: Value) -> list[int]:
    """Registers for one value: scaled, big-endian words, -1 when invalid or out of range."""
    if reg.type == "string":
        raw = str(value or "").encode("ascii", "replace")[: 2 * reg.size].ljust(2 * reg.size, b"\0")
        return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    bits = 16 * reg.size
    number = INVALID if value is None else round(float(value) * (reg.scale or 1))
    if not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
        number = INVALID  # what openWB does with values that do not fit
    raw_int = number & (2**bits - 1)
    return [(raw_int >> (16 * (reg.size - 1 - i))) & 0xFFFF for i in range(reg.size)]


def decode_value(reg: Register, words: list[int]) -> Value:
    """The value of a register as a client reads it (scaled back, None for -1)."""
    if reg.type == "string":
        raw_bytes = b"".join(w.to_bytes(2, "big") for w in words)
        return raw_bytes.rstrip(b"\0").decode("ascii", "replace")
    raw = 0
    for word in words:
        raw = (raw << 16) | word
    bits = 16 * reg.size
    number = raw - 2**bits if raw >= 2 ** (bits - 1) else raw
    if number == INVALID:
        return None
    scale = reg.scale or 1
    return number / scale if scale != 1 else number


def signed16(word: int) -> int:
    """A register as the int16 the table defines."""
    return word - 0x10000 if word >= 0x8000 else word


def load(path: str | None = None) -> RegisterMap:
    """Read register_map.csv (the packaged copy unless ``path`` is given)."""
    if path is None:
        text = resources.files(__package__).joinpath("register_map.csv").read_text("utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    rows = csv.DictReader(text.splitlines())
    registers = []
    for row in rows:
        if row["type"] not in _SIZES or row["access"] not in ("R", "W"):
            raise ValueError(f"register_map.csv: bad type/access in row {row}")
        registers.append(
            Register(
                offset=int(row["offset"]),
                name=row["name"],
                type=row["type"],
                access=row["access"],
                scale=int(row["scale"]) if row["scale"] else None,
                unit=row["unit"],
                description=row["description"],
            )
        )
    return RegisterMap(tuple(registers))


REGISTER_MAP = load()


def format_table(regmap: RegisterMap, lp: int = 1, *, markdown: bool = False) -> str:
    """The register map as a text (or Markdown) table with the addresses of LP ``lp``."""
    header = ("Address", "Type", "R/W", "Scale", "Unit", "Name", "Description")
    rows = []
    for reg in regmap.registers:
        first = lp_base(lp) + reg.offset
        address = f"{first}" if reg.size == 1 else f"{first}-{first + reg.size - 1}"
        scale = f"x{reg.scale}" if reg.scale and reg.scale != 1 else ""
        rows.append((address, reg.type, reg.access, scale, reg.unit, reg.name, reg.description))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in (header, *rows)
    )


def chargepoint_values(point: Viewable, now: float) -> dict[str, Value]:
    """Register values by name (see register_map.csv) of ``point`` as the view shows it."""
    return register_values(point.identity, show(point, now))


def register_values(identity: Identity, shown: Shown) -> dict[str, Value]:
    """Register values by name of what the view shows."""
    # The counter is ours and stays valid while the station is away; a -1 here would read as
    # 4.29 GWh to evcc, which takes this register as uint32.
    values: dict[str, Value] = {
        "hardware_type": SERIES2,
        "serial_number": identity.serial_number,
        "energy_imported": int(shown.energy_wh),
        "plugged": int(shown.plugged),
        "charging": int(shown.charging),
        "offered_current": shown.offered_a,
        # Power and currents are summed by clients (evcc and Home Assistant): 0 without fresh
        # data, as openWB serves them, so an offline station adds nothing instead of -1 W.
        "power": shown.power_w,
    }
    for i in range(3):
        values[f"voltage_l{i + 1}"] = shown.voltages_v[i]  # None (-1): unknown
        values[f"current_l{i + 1}"] = shown.currents_a[i]
        values[f"power_l{i + 1}"] = shown.phase_powers_w[i]
    return values


class BlockEncoder:
    """Encodes a charge point's 100 registers, reusing the last block while nothing it shows
    has changed: the state (replaced on every change), the whole Wh and the freshness."""

    def __init__(self, regmap: RegisterMap = REGISTER_MAP) -> None:
        self._regmap = regmap
        # By LP, not by station: at most nine entries, however many stations come and go.
        self._last: dict[int | None, tuple[State, int, Freshness, list[int]]] = {}

    def block(self, point: Viewable, now: float) -> list[int]:
        """The registers of ``point``'s LP block as of ``now``."""
        state, energy = point.state, int(point.energy_wh)
        fresh = freshness(point, now)
        last = self._last.get(point.identity.lp)
        if last is not None and last[0] is state and last[1] == energy and last[2] == fresh:
            return last[3]
        block = self._regmap.encode(chargepoint_values(point, now))
        self._last[point.identity.lp] = (state, energy, fresh, block)
        return block
