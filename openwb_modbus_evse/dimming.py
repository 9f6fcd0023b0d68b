"""Grid operator dimming (§14a EnWG): a runtime limit on the supply all stations share.

Three sources can set it: the MQTT topic ``<mqtt_topic_prefix>set/supply_limit``, the HTTP API
(``POST /api/supply/limit``) and ``dim_command``, polled, which reads a control box's contact.
Each source holds its own limit (or none); the lowest one is the dimming limit. The supply
(:class:`~.supply.SupplyLimit`) uses the lower of it and ``supply_max_current``, never below the
§14a floor. Every source's limit is kept in the state file, so it holds across a restart from
the first moment (the command's until its first run says otherwise).

A limit is given in A per phase, or in W: converted at 230 V on 3 phases (W / 690).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shlex
from collections.abc import Callable
from typing import Any

from .config import Settings
from .store import Store, StoreError
from .supply import SupplyLimit

log = logging.getLogger(__name__)

MQTT, HTTP, COMMAND = "mqtt", "http", "command"
SOURCES = (MQTT, HTTP, COMMAND)
RECORD = "dimming/"  # store records: a source's limit, by source name
VOLTS_PER_PHASE, PHASES = 230, 3  # how a limit in watts becomes amperes per phase
MAX_AMPS = 1000.0  # as supply_max_current
MAX_WATTS = MAX_AMPS * VOLTS_PER_PHASE * PHASES
NOT_DIMMED, DIMMED = 1, 0  # dim_command's exit codes; any other counts as dimmed
# With exit code 0, what the command prints may say it too (e.g. gpioget prints the line's 0/1).
SAYS_DIMMED = ("1", "on", "true", "dimmed")
SAYS_NOT_DIMMED = ("0", "off", "false")
MAX_OUTPUT = 256  # bytes of its output read


class BadLimit(ValueError):
    """A limit that cannot be understood; the message says what is accepted."""


USAGE = (
    'a number of amperes per phase ("16", "16 A"), of watts ("11000 W", "11 kW"), JSON '
    '({"amps": 16} or {"watts": 11000}), or empty / "null" / {"amps": null} to clear'
)


def parse_limit(payload: bytes | str) -> int | None:
    """A limit as sent over MQTT: centiamps per phase, or None to clear; :class:`BadLimit`."""
    try:
        text = payload.decode() if isinstance(payload, bytes) else payload
    except UnicodeDecodeError:
        raise BadLimit(f"not UTF-8; send {USAGE}") from None
    text = text.strip()
    if not text or text.lower() == "null":
        return None
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            raise BadLimit(f"not valid JSON; send {USAGE}") from None
        return limit_from_json(body)
    lower = text.lower().replace(" ", "")
    for unit, factor, watts in (("kw", 1000.0, True), ("w", 1.0, True), ("a", 1.0, False)):
        if lower.endswith(unit):
            return _centiamps(_number(lower[: -len(unit)], text) * factor, watts)
    return _centiamps(_number(lower, text), False)


def limit_from_json(body: Any) -> int | None:
    """``{"amps": A}`` or ``{"watts": W}`` (null clears): centiamps or None; :class:`BadLimit`."""
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in ("amps", "watts"):
        raise BadLimit(f'send {{"amps": A}} or {{"watts": W}} (one key); {USAGE}')
    ((key, value),) = body.items()
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadLimit(f"{key} must be a number or null, got {value!r}")
    return _centiamps(float(value), key == "watts")


def _number(text: str, original: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadLimit(f"{original[:40]!r} is no limit; send {USAGE}") from None


def _centiamps(value: float, watts: bool) -> int:
    top, unit = (MAX_WATTS, "W") if watts else (MAX_AMPS, "A")
    if not math.isfinite(value) or not 0 <= value <= top:
        raise BadLimit(f"the limit must be 0..{top:g} {unit}, got {value:g}")
    amps = value / (VOLTS_PER_PHASE * PHASES) if watts else value
    return math.floor(amps * 100)  # rounded down: never more than asked


class Dimming:
    """The sources' limits: kept, persisted, applied to the supply."""

    def __init__(
        self, settings: Settings, supply: SupplyLimit, rebalance: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.sources = settings.dim_sources
        self._supply = supply
        self._rebalance = rebalance
        self._store: Store | None = None
        self.limits: dict[str, int] = {}  # centiamps per source that sets one
        self._listeners: list[Callable[[], None]] = []
        self._command_state: str | None = None  # last outcome of dim_command, for the log

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every change of a source's limit."""
        self._listeners.append(listener)

    def load(self, store: Store) -> None:
        """Take over the limits kept in the state file (of the sources configured now)."""
        self._store = store
        for key, value in store.records(RECORD).items():
            source = key.removeprefix(RECORD)
            ca = value.get("ca") if isinstance(value, dict) else None
            if source not in self.sources:
                log.warning("dimming: the kept %s limit is ignored: that source is off", source)
            elif isinstance(ca, int) and not isinstance(ca, bool) and ca >= 0:
                self.limits[source] = ca
                log.info("dimming: %s limit %g A per phase kept from before", source, ca / 100)
        self._apply()

    @property
    def limit_ca(self) -> int | None:
        """The dimming limit: the lowest source's, None if none sets one."""
        return min(self.limits.values()) if self.limits else None

    def set(self, source: str, ca: int | None) -> None:
        """``source`` sets its limit (None clears it); kept in the state file, applied at once.

        Raises :class:`~.store.StoreError` if it cannot be kept; it applies all the same (a
        lower limit must not wait for a disk).
        """
        assert source in SOURCES
        if self.limits.get(source) == ca:
            return
        if ca is None:
            self.limits.pop(source, None)
            log.info("dimming: %s limit cleared", source)
        else:
            self.limits[source] = ca
            log.info("dimming: %s limit %g A per phase", source, ca / 100)
        self._apply()
        if self._store is not None:
            value = None if ca is None else {"ca": ca}
            self._store.save_records({RECORD + source: value})

    def _apply(self) -> None:
        self._supply.dim_ca = self.limit_ca
        self._rebalance()
        for listener in self._listeners:
            listener()

    # --- dim_command ------------------------------------------------------------------------

    async def poll(self) -> None:
        """Run ``dim_command`` every ``dim_poll_interval`` s; runs until cancelled."""
        s = self.settings
        while True:
            dimmed = await self.read_contact()
            try:
                self.set(COMMAND, round(s.dim_limit * 100) if dimmed else None)
            except StoreError as err:
                log.error("dimming: cannot keep the command's limit: %s", err)
            await asyncio.sleep(s.dim_poll_interval)

    async def read_contact(self) -> bool:
        """Whether ``dim_command`` says dimmed; a failure counts as dimmed (the safe side)."""
        argv = shlex.split(self.settings.dim_command)
        timeout = self.settings.dim_poll_interval
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
            )
        except OSError as err:
            return self._outcome(f"cannot run ({err.strerror or err})")

        async def run() -> tuple[bytes, int]:
            assert proc.stdout is not None
            # Bounded: a command that writes on and on fills the pipe, stalls and times out.
            output = await proc.stdout.read(MAX_OUTPUT)
            return output, await proc.wait()

        try:
            output, code = await asyncio.wait_for(run(), timeout)
        except TimeoutError:
            return self._outcome(f"did not finish within {timeout:g} s")
        finally:
            if proc.returncode is None:
                proc.kill()
                # Its exit counts only once the pipe is drained too; dead, it writes no more.
                await proc.communicate()
        if code == NOT_DIMMED:
            self._note("not dimmed")
            return False
        if code != DIMMED:
            return self._outcome(f"exit code {code}")
        words = output.decode(errors="replace").split()
        said = words[0].lower() if words else ""
        if said in SAYS_NOT_DIMMED:
            self._note("not dimmed")
            return False
        if said and said not in SAYS_DIMMED:
            return self._outcome(f"output {said[:20]!r}")
        return self._outcome("dimmed")

    def _outcome(self, what: str) -> bool:
        """Dimmed: by the contact, or by a failure (the safe side)."""
        self._note(what)
        return True

    def _note(self, what: str) -> None:
        """Log a change of the command's outcome once (not every poll)."""
        if what == self._command_state:
            return
        self._command_state = what
        if what in ("dimmed", "not dimmed"):
            log.info("dimming: dim_command says %s", what)
        else:
            log.warning("dimming: dim_command failed (%s); counted as dimmed", what)
