"""The charge points: by station serial and by LP, their LP numbers, energy and change events.

A station keeps its LP: configured in ``[[station]]``, remembered in the state file, or the lowest
free one on first contact. A new station is on probation: its LP (and energy counter) is written
to the state file once it has stayed connected with valid data for ``lp_remember_after``; if it
leaves sooner its LP is free again. A charge point outlives its station's sessions.

Change events: every charge point notifies the registry when its state changes (from its creation
on); the registry collects the changed points and hands them to its subscribers once per event
loop turn, then wakes their stations' sessions so they act on the new state at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from . import chargepoint as cp
from . import identity, view
from .actions import ActionError, ActionErrorKind
from .config import CONTROLLERS, MAX_LP, MQTT_CONTROLLERS, Settings, StationConfig
from .control import BRIDGE_MQTT, MANUAL, Command, Control, Kind
from .evse.link import Session
from .evse.protocol import NO_CALIBRATION, Pilot, Proximity, StationCalibration, StationData
from .identity import Identities, Peer, peer_of
from .limits import Network
from .ratelimit import RateLimit
from .store import Store, StoreError

log = logging.getLogger(__name__)

REPORT_RECORD = "report/"  # store records: a station's last report, by serial
# Store records: stations whose LP is theirs for good, by serial: "driven" (a controller has
# charged through it) or "confirmed" (an operator moved it or updated its firmware).
CLAIM_RECORD = "claim/"

STALE_POLLS = 3  # data older than this many poll intervals counts as none
# Energy counted by stations that left before their LP was remembered, kept in memory (not in
# the state file) so a new station that reconnects within its first minute does not restart at
# 0; only this many, the oldest forgotten first, so random serials cannot grow it.
RELEASED_ENERGY_KEPT = 32

Listener = Callable[[list[cp.ChargePoint]], None]
# State-file records: a station's controller chosen at runtime, and the manual controller's
# current (centiamps), both by serial.
CONTROLLER_RECORD, MANUAL_RECORD = "controller/", "manual/"


class Registry:
    """Every charge point the service knows; the only place that creates or drops one."""

    def __init__(
        self,
        settings: Settings,
        control: Control,
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._wall = wall  # Unix time: what is kept across a restart is timed by it
        self.store: Store | None = None  # the state file, from load() on
        self._control = control
        self._clock = clock
        self._points: dict[str, cp.ChargePoint] = {}  # by station serial
        self._by_lp: dict[int, cp.ChargePoint] = {}
        self._sessions: dict[str, Session] = {}  # the latest session of each station
        self._stored_energy: dict[str, float] = {}  # as loaded at start, for stations to come
        # The last report and contactor rest of each station, as kept for a restart.
        self._stored_reports: dict[str, dict[str, Any]] = {}
        self._saved_reports: dict[str, dict[str, Any]] = {}
        self._claims: set[str] = set()
        self._saved_energy: dict[str, float] = {}  # what the state file holds
        # Stations whose charge point stays when they disconnect: configured, or LP remembered.
        # Any other charge point lives only while its station is connected.
        self._kept: set[str] = set()
        self._probations: dict[str, asyncio.Task[None]] = {}
        self._released_energy: OrderedDict[str, float] = OrderedDict()
        # Lines about stations that are not (yet) remembered: a peer that connects with a new
        # serial every few milliseconds must not write two log lines each time.
        self._newcomer_log = RateLimit(per_second=0.1, burst=20, kind="new_station")
        self._listeners: list[Listener] = []
        self._dirty: dict[str, cp.ChargePoint] = {}
        self._flush_pending = False
        self._controllers: dict[str, str] = {}  # chosen at runtime, by serial (state file)
        self._manual_ca: dict[str, int] = {}  # the manual controller's current, by serial
        self.identities = Identities(wall)  # where stations are seen; claims on their IDs
        self._claim_log = RateLimit(per_second=1 / 60, burst=5, kind="station_claim")
        self._public_key = b""  # the key of the stations' public ids (state file)

    # --- read API (what interfaces get) -----------------------------------------------------

    def get(self, serial: str) -> cp.ChargePoint | None:
        """The charge point of a station."""
        return self._points.get(serial)

    def at(self, lp: int) -> cp.ChargePoint | None:
        """The charge point served as LP ``lp``."""
        return self._by_lp.get(lp)

    def points(self) -> list[cp.ChargePoint]:
        """Every charge point, in LP order (unserved stations last)."""
        return sorted(self._points.values(), key=lambda p: p.identity.lp or MAX_LP + 1)

    def session(self, serial: str) -> Session | None:
        """The station's session while it is connected."""
        session = self._sessions.get(serial)
        return session if session is not None and not session.closed else None

    def unconfirmed(self, point: cp.ChargePoint) -> bool:
        """Its station has been sent a command that no report has shown yet."""
        session = self.session(point.identity.serial)
        return session is not None and session.unconfirmed

    def keeps(self, serial: str) -> bool:
        """A known station: configured in [[station]], or its LP remembered or claimed (its
        charge point stays when it disconnects)."""
        return serial in self._kept or self.settings.station_by_serial(serial) is not None

    def claim(self, serial: str) -> Peer | None:
        """Where a peer connects from that claims the station's ID, unconfirmed (None: none)."""
        session = self.identities.claimant(serial)
        return None if session is None else peer_of(session)

    def claim_text(self, serial: str) -> str | None:
        """:meth:`claim` in words, for the page and the station list."""
        return _text(self.claim(serial))

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with the charge points that changed, once per loop turn (in the
        order of subscription; before the stations' sessions are woken)."""
        self._listeners.append(listener)

    # --- start-up ---------------------------------------------------------------------------

    def load(self, store: Store) -> None:
        """Configured stations, then remembered ones, each on its LP (served at once)."""
        self.store = store
        energy = self._stored_energy = self._store.energy_wh()
        self._saved_energy = dict(energy)
        for key, value in store.records(CONTROLLER_RECORD).items():
            serial = key.removeprefix(CONTROLLER_RECORD)
            if self._usable_controller(value) is None:
                self._controllers[serial] = value
            else:
                log.warning(
                    "station %s: stored controller %r cannot run here; ignored", serial, value
                )
        for key, value in store.records(MANUAL_RECORD).items():
            if isinstance(value, int) and not isinstance(value, bool):
                self._manual_ca[key.removeprefix(MANUAL_RECORD)] = value
        reports = self._store.records(REPORT_RECORD)
        self._stored_reports = {k.removeprefix(REPORT_RECORD): v for k, v in reports.items()}
        self._saved_reports = dict(self._stored_reports)
        self._claims = {k.removeprefix(CLAIM_RECORD) for k in self._store.records(CLAIM_RECORD)}
        self.identities.load(store)
        self._public_key = identity.load_public_key(store)
        for station in self.settings.station:
            if station.lp is not None:  # else: its remembered LP below, or one when it connects
                self._new(station.serial, station.lp, energy.get(station.serial, 0.0))
                self._kept.add(station.serial)
        configured_lps = {s.lp for s in self.settings.station if s.lp is not None}
        for serial, lp in sorted(self._store.lp_assignments().items(), key=lambda kv: kv[1]):
            if serial in self._points:
                continue
            if lp in configured_lps or not 1 <= lp <= MAX_LP:
                log.info("station %s: LP%d is configured for another station now", serial, lp)
                self._store.forget_lp(serial)
                continue
            if not self._has_claim(serial):
                # Never driven, never confirmed: eight fake stations that answered polls for a
                # minute must not hold LPs across a restart. It gets one again when it connects.
                log.info(
                    "station %s: LP%d not restored (no controller has charged through it and "
                    "no operator confirmed it)",
                    serial,
                    lp,
                )
                self._store.forget_lp(serial)
                continue
            self._new(serial, lp, energy.get(serial, 0.0))
            self._kept.add(serial)

    def by_public_id(self, public_id: str) -> cp.ChargePoint | None:
        """The charge point whose station is named ``public_id`` in public."""
        return next((p for p in self._points.values() if p.identity.public_id == public_id), None)

    @property
    def _store(self) -> Store:
        assert self.store is not None, "load() first"
        return self.store

    # --- the link's hooks -------------------------------------------------------------------

    def calibration(self, serial: str) -> StationCalibration:
        """A station's configured calibration."""
        station = self.settings.station_by_serial(serial)
        return station.calibration if station else NO_CALIBRATION

    def address(self, serial: str) -> Network | None:
        """The only address a station may connect from (None: any)."""
        station = self.settings.station_by_serial(serial)
        return station.address if station else None

    def recognises(self, session: Session) -> bool:
        """Whether a registering session is the station as it was last seen (identity.py). A
        station pinned to an address in the config is checked by the link instead."""
        serial = session.serial
        assert serial is not None
        if self.address(serial) is not None:
            return True
        return self.identities.recognises(serial, peer_of(session))

    def attach(self, session: Session) -> cp.ChargePoint:
        """A station's session is established: its charge point (new or kept) drives it; a
        peer that claims a station's ID from elsewhere gets a charge point of its own that keeps
        it safe (see :meth:`confirm_peer`)."""
        serial = session.serial
        assert serial is not None
        if not session.recognised:
            return self._hold_claimant(session)
        self.identities.release(serial)
        point = self._point_for(serial)
        self._sessions[serial] = session
        if serial in self._kept:
            self.identities.seen(serial, peer_of(session))
        else:
            previous = self._probations.pop(serial, None)
            if previous is not None:
                previous.cancel()
            self._probations[serial] = asyncio.create_task(self._probation(session, point))
        return point

    def _hold_claimant(self, session: Session) -> cp.ChargePoint:
        serial = session.serial
        assert serial is not None
        self.identities.hold(session)
        point = self._points.get(serial)
        name = point.name if point is not None else self._display_name(serial, None)
        if self._claim_log.allow(self._clock()):
            log.warning(
                "station %s (%s) connects from %s, but it was last seen at %s: held safe and not "
                "served until the owner confirms that it is this station (on the page, or "
                "`openwb-modbus-evse confirm %s`)%s",
                name,
                serial,
                peer_of(session),
                self.identities.seen_at(serial),
                serial,
                self._claim_log.left_out(),
            )
        if point is not None:
            self._changed(point)  # the page and the status show the claim
        # Not in the registry: no controller reaches it, it counts nothing anyone sees, and with
        # nothing requested its state machine stops a charge the safe way and keeps it stopped.
        claimant = cp.ChargePoint(
            cp.Identity(serial=serial, lp=None, name=f"claimant of {name}", serial_number=""),
            self._config(serial, MANUAL),  # manual: no heartbeat, and nobody writes to it
            max_data_age=STALE_POLLS * self.settings.poll_interval,
        )
        claimant.on_change = session.wake
        return claimant

    def confirm_peer(self, serial: str) -> Peer:
        """The owner says the peer that claims the station's ID is the station (it moved, or its
        board was replaced): it is served from now on, and remembered where it is."""
        session = self.identities.claimant(serial)
        if session is None:
            raise ActionError(
                ActionErrorKind.NOT_FOUND, f"no unconfirmed peer claims station {serial} now"
            )
        previous, peer = self.identities.seen_at(serial), peer_of(session)
        session.recognised = True
        point = self.attach(session)
        session.promote(point)
        self.confirm(point)  # an owner's act on the station: its LP is its own for good
        self.identities.seen(serial, peer)
        log.info(
            "station %s: the owner confirmed the peer at %s (it was last seen at %s)",
            serial,
            peer,
            previous,
        )
        return peer

    # --- charge points ----------------------------------------------------------------------

    def _config(self, serial: str, controller: str) -> cp.ChargePointConfig:
        station = self.settings.station_by_serial(serial) or StationConfig(serial=serial)
        return cp.ChargePointConfig(
            max_current_a=station.max_current,
            cable=station.cable,
            phases=station.phases,
            can_switch_phases=station.phase_switch_command is not None,
            stop_timeout=self.settings.stop_timeout,
            phase_switch_pause=self.settings.phase_switch_pause,
            controller=controller,
            supply_limited=self.settings.supply_shared,
            contactor_min_off=self.settings.contactor_min_off,
            contactor_by_request=controller == BRIDGE_MQTT,
            failsafe_ca=round(station.failsafe_current * 100),
            heartbeat=controller != MANUAL,
        )

    def _new(self, serial: str, lp: int | None, energy_wh: float) -> cp.ChargePoint:
        station = self.settings.station_by_serial(serial) or StationConfig(serial=serial)
        controller = self.controller_of(serial)
        public_id = identity.public_id(self._public_key, serial)
        ident = cp.Identity(
            serial=serial,
            lp=lp,
            name=self._display_name(serial, lp),
            serial_number=station.serial_number or f"EVSE-{public_id.upper()}",
            public_id=public_id,
        )
        point = cp.ChargePoint(
            ident,
            self._config(serial, controller),
            energy_wh=energy_wh,
            max_data_age=STALE_POLLS * self.settings.poll_interval,
        )
        self._restore(point)
        point.on_change = lambda: self._changed(point)
        self._points[serial] = point
        if lp is not None:
            self._by_lp[lp] = point
        self._control.sync(point)
        if controller == MANUAL and self._manual_ca.get(serial):
            self._apply_manual(point, self._manual_ca[serial])
        self._changed(point)
        return point

    def _apply_manual(self, point: cp.ChargePoint, centiamps: int) -> None:
        """The owner's kept choice applies again (start-up): through the control path."""
        # A refusal is counted and logged there; the station stays stopped.
        with contextlib.suppress(cp.Refused):
            self._control.execute(MANUAL, [(point, Command(Kind.CURRENT, centiamps))])

    def _restore(self, point: cp.ChargePoint) -> None:
        """Take over what was kept of the station's last report (see :meth:`save_energy`)."""
        kept = self._stored_reports.get(point.identity.serial)
        if kept is None:
            return
        try:
            age = self._wall() - float(kept["at"])
            data = StationData(
                contactor=bool(kept["contactor"]),
                pwm=int(kept["pwm"]),
                pilot=Pilot(int(kept["pilot"])),
                proximity=Proximity(int(kept["proximity"])),
                voltages_mv=(0, 0, 0),
                currents_ma=(0, 0, 0),
                rssi_dbm=0,
                uptime_ms=0,
                cp_adc=0,
                pp_adc=0,
            )
            rest = kept.get("rest_until")
            rest_left = None if rest is None else float(rest) - self._wall()
        except (KeyError, TypeError, ValueError) as err:
            log.warning("station %s: kept report ignored (%s)", point.identity.serial, err)
            return
        if age < 0 or age > view.PLUG_HOLD:
            return  # from the future (a clock step), or the station has switched itself off
        now = self._clock()
        closed_not_before = now + rest_left if rest_left is not None and rest_left > 0 else None
        point.commit(cp.restore(point.state, data, now - age, closed_not_before))

    def _report_record(self, point: cp.ChargePoint) -> dict[str, Any] | None:
        state = point.state
        data = state.data
        if data is None or state.data_at is None:
            return None
        now, wall = self._clock(), self._wall()
        rest = state.closed_not_before
        return {
            "at": round(wall - (now - state.data_at), 3),
            "pilot": int(data.pilot),
            "pwm": data.pwm,
            "contactor": data.contactor,
            "proximity": int(data.proximity),
            "rest_until": None if rest is None else round(wall + (rest - now), 3),
        }

    def _display_name(self, serial: str, lp: int | None) -> str:
        station = self.settings.station_by_serial(serial)
        if station is not None and station.name:
            return station.name
        # Not the ID: this name is shown to anyone (metrics, the page).
        return f"LP{lp}" if lp else f"EVSE-{identity.public_id(self._public_key, serial).upper()}"

    def _point_for(self, serial: str) -> cp.ChargePoint:
        point = self._points.get(serial)
        if point is not None:
            return point
        energy = self._released_energy.pop(serial, None) or self._stored_energy.get(serial, 0.0)
        known = self.settings.is_known(serial)
        if not known and self.settings.unknown_stations == "hold":
            self._log_newcomer(
                logging.WARNING,
                "station %s is not in known_stations: polled and kept safe, not served "
                '(unknown_stations = "hold")',
                serial,
            )
            return self._new(serial, None, energy)
        lp = next((n for n in range(1, MAX_LP + 1) if n not in self._by_lp), None)
        if lp is None:
            lp = self._give_way()
        if lp is None:
            log.warning(
                "station %s: all %d LPs are taken; it is kept safe, not served", serial, MAX_LP
            )
            return self._new(serial, None, energy)
        point = self._new(serial, lp, energy)
        if known:
            self._remember(point)
        else:
            self._log_newcomer(
                logging.INFO,
                "station %s is served as LP%d; the LP is remembered once it has stayed "
                "connected with valid data for %g s",
                serial,
                lp,
                self.settings.lp_remember_after,
            )
        return point

    def _has_claim(self, serial: str) -> bool:
        return serial in self._claims or self.settings.is_known(serial)

    def _claim(self, serial: str, how: str) -> None:
        """The LP is the station's for good (``how``: driven or confirmed)."""
        if serial not in self._claims:
            self._claims.add(serial)
            try:
                self._store.save_records({CLAIM_RECORD + serial: how})
            except StoreError as err:  # kept all the same; only a restart forgets it
                log.error("%s", err)

    def _give_way(self) -> int | None:
        """Every LP is taken: free the LP of a station that no controller has ever charged
        through and no operator confirmed (a disconnected one first); None if there is none."""
        candidates = [p for p in self._by_lp.values() if not self._has_claim(p.identity.serial)]
        if not candidates:
            return None
        point = min(candidates, key=lambda p: (p.state.connected, p.identity.lp or 0))
        lp = point.identity.lp
        assert lp is not None
        del self._by_lp[lp]
        self._kept.discard(point.identity.serial)
        try:
            self._store.forget_lp(point.identity.serial)
        except StoreError as err:
            log.error("%s", err)
        serial = point.identity.serial
        point.identity = replace(point.identity, lp=None, name=self._display_name(serial, None))
        point.commit(cp.reassign(point.state, self._clock()))  # nothing written for it applies
        self._control.sync(point)
        self._changed(point)
        log.warning(
            "station %s gives LP%d to a newcomer: every LP was taken, and no controller has "
            "charged through it (nor has an operator confirmed it); it is kept safe, not served",
            serial,
            lp,
        )
        return lp

    def _log_newcomer(self, level: int, message: str, *args: object) -> None:
        if self._newcomer_log.allow(self._clock()):
            log.log(level, message + "%s", *args, self._newcomer_log.left_out())

    def confirm(self, point: cp.ChargePoint) -> None:
        """An operator acts on the station: it keeps its LP for good, also across restarts."""
        self.remember(point)
        if point.identity.lp is not None:
            self._claim(point.identity.serial, "confirmed")

    def remember(self, point: cp.ChargePoint) -> None:
        """Keep ``point`` and its LP, also across restarts (no-op if it is kept already)."""
        serial, lp = point.identity.serial, point.identity.lp
        if serial in self._kept or lp is None:
            return
        self._remember(point)

    def _remember(self, point: cp.ChargePoint) -> None:
        serial, lp = point.identity.serial, point.identity.lp
        assert lp is not None
        self._keep(serial)
        try:
            self._store.assign_lp(serial, lp)
        except StoreError as err:  # served and kept all the same; only a restart forgets it
            log.error("%s", err)
            return
        log.info("station %s is LP%d from now on", serial, lp)

    def _keep(self, serial: str) -> None:
        """The station keeps its charge point; where it is seen is remembered from now on."""
        self._kept.add(serial)
        session = self.session(serial)
        if session is not None:
            self.identities.seen(serial, peer_of(session))

    async def _probation(self, session: Session, point: cp.ChargePoint) -> None:
        """Remember a new station's LP once it stayed with valid data; release it if it left."""
        serial = point.identity.serial
        wait = self.settings.lp_remember_after
        try:
            while True:
                try:
                    await asyncio.wait_for(session.wait_closed(), wait)
                except TimeoutError:
                    fresh = cp.fresh_data(point.state, self._clock(), point.max_data_age)
                    if fresh is not None and point.identity.lp is not None:
                        self.remember(point)
                        return
                    wait = self.settings.poll_interval  # connected, but no valid data (yet)
                    continue
                break
            if serial not in self._kept and self.session(serial) is None:
                self._release(point)
        finally:
            if self._probations.get(serial) is asyncio.current_task():
                del self._probations[serial]

    def _release(self, point: cp.ChargePoint) -> None:
        """Forget a charge point that never earned its LP: memory, metrics, LP all freed."""
        serial, lp = point.identity.serial, point.identity.lp
        if self._points.get(serial) is not point:
            return
        self._drop(point)
        if lp is not None:
            self._log_newcomer(
                logging.INFO,
                "station %s left before its LP was remembered: LP%d is free",
                serial,
                lp,
            )
        if point.energy_wh > 0:
            self._released_energy[serial] = point.energy_wh
            while len(self._released_energy) > RELEASED_ENERGY_KEPT:
                self._released_energy.popitem(last=False)

    def _drop(self, point: cp.ChargePoint) -> None:
        serial, lp = point.identity.serial, point.identity.lp
        del self._points[serial]
        self._sessions.pop(serial, None)
        if lp is not None and self._by_lp.get(lp) is point:
            del self._by_lp[lp]
        point.on_change = lambda: None
        self._dirty.pop(serial, None)
        for listener in self._listeners:
            listener([point])  # its last change: interfaces see it gone

    # --- change events ----------------------------------------------------------------------

    def _changed(self, point: cp.ChargePoint) -> None:
        serial = point.identity.serial
        state = point.state
        closed = state.connected and state.data is not None and state.data.contactor
        if closed and state.requested_ca > 0 and serial not in self._claims:
            # A controller has charged through it: it keeps its LP (and its energy) from now
            # on, also across a restart, whatever its probation says.
            self.remember(point)
            if point.identity.lp is not None:
                self._claim(serial, "driven")
        self._dirty[serial] = point
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        # A listener may change points again (the supply's grants): those come round once more.
        for _ in range(len(self._points) + 2):
            if not self._dirty:
                return
            changed = list(self._dirty.values())
            self._dirty.clear()
            for listener in self._listeners:
                listener(changed)
            for point in changed:
                session = self.session(point.identity.serial)
                if session is not None:
                    session.wake()
        if self._dirty and not self._flush_pending:  # still changing: next turn
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    # --- operator actions -------------------------------------------------------------------

    def stations(self) -> list[dict[str, object]]:
        """Every station the service knows (connected or remembered), in LP order."""
        remembered = self._store.lp_assignments()
        return [
            {
                "serial": p.identity.serial,
                "lp": p.identity.lp,
                "name": p.name,
                "connected": p.state.connected,
                "charging": cp.busy(p.state),
                "configured": self.settings.station_by_serial(p.identity.serial) is not None,
                "remembered": p.identity.serial in remembered,
                "controller": p.state.config.controller,
                "serial_number": p.identity.serial_number,
                "seen_at": _text(self.identities.seen_at(p.identity.serial)),
                "claim": self.claim_text(p.identity.serial),
            }
            for p in self.points()
        ]

    def _movable(self, serial: str, what: str) -> cp.ChargePoint:
        point = self._points.get(serial)
        if point is None:
            raise ActionError(ActionErrorKind.NOT_FOUND, f"no station {serial}")
        station = self.settings.station_by_serial(serial)
        if station is not None and station.lp is not None:
            raise ActionError(
                ActionErrorKind.CONFLICT,
                f"{what} refused: station {serial} is set to LP{station.lp} in the config file",
            )
        if cp.busy(point.state):
            raise ActionError(
                ActionErrorKind.CONFLICT, f"{what} refused: {point.name} is charging; stop it first"
            )
        return point

    def move(self, serial: str, lp: int) -> None:
        """Serve the station as LP ``lp`` (a free one) from now on, also after restarts."""
        if not 1 <= lp <= MAX_LP:
            raise ActionError(ActionErrorKind.BAD_REQUEST, f"LP must be 1..{MAX_LP}, got {lp}")
        point = self._movable(serial, "move")
        holder = self._by_lp.get(lp)
        if holder is point:
            return
        if holder is not None:
            raise ActionError(ActionErrorKind.CONFLICT, f"LP{lp} is taken by {holder.name}")
        self._store.assign_lp(serial, lp)
        self._keep(serial)  # an operator's choice: no probation
        self._claim(serial, "confirmed")
        probation = self._probations.pop(serial, None)
        if probation is not None:
            probation.cancel()
        if point.identity.lp is not None:
            del self._by_lp[point.identity.lp]
        self._by_lp[lp] = point
        point.identity = replace(point.identity, lp=lp, name=self._display_name(serial, lp))
        # The controller of the new LP has written nothing for it yet, and its heartbeat (an
        # openWB tree is per LP) may be another one: a current offered for the old LP must not
        # charge here.
        point.commit(cp.reassign(point.state, self._clock()))
        self._forget_manual(serial)  # the owner's current was for the old LP too
        self._control.sync(point)
        self._changed(point)
        log.info("station %s is LP%d from now on (moved by an operator)", serial, lp)

    def forget(self, serial: str) -> None:
        """Drop a station that is not connected: its LP is free again (its energy is kept)."""
        point = self._movable(serial, "forget")
        if point.state.connected:
            raise ActionError(
                ActionErrorKind.CONFLICT,
                f"forget refused: {point.name} is connected; only a station that is gone can be "
                "forgotten",
            )
        self.save_energy()  # should it come back, it continues its counter
        self._stored_energy[serial] = point.energy_wh
        self._store.forget_lp(serial)
        # Should it come back, it is new, from wherever it is.
        self._store.save_records({CLAIM_RECORD + serial: None, **self.identities.forget(serial)})
        self._claims.discard(serial)
        self._forget_manual(serial)  # should it come back, it starts stopped
        self._kept.discard(serial)
        self._drop(point)
        log.info("station %s (%s) forgotten by an operator", serial, point.name)

    # --- the controller of a station, and the owner's manual choices ----------------------------

    def controller_of(self, serial: str) -> str:
        """Who drives the station: chosen at runtime (kept in the state file), else configured."""
        return self._controllers.get(serial) or self.settings.controller_of(serial)

    def _usable_controller(self, controller: object) -> str | None:
        """Why ``controller`` cannot drive a station with these settings (None: it can)."""
        if controller not in CONTROLLERS:
            return f"controller must be one of {', '.join(CONTROLLERS)}"
        if controller in MQTT_CONTROLLERS and not self.settings.mqtt_host:
            return f"{controller} needs mqtt_host in the config"
        if controller == BRIDGE_MQTT and not self.settings.bridge_topics:
            return f"{controller} needs bridge_topics in the config"
        return None

    def usable_controllers(self) -> list[str]:
        """The controllers a station can be switched to with these settings."""
        return [c for c in CONTROLLERS if self._usable_controller(c) is None]

    def set_controller(self, serial: str, controller: str) -> None:
        """Let ``controller`` drive the station from now on, also after restarts. What the old
        controller wrote stops applying; the new one starts from nothing (manual: stopped)."""
        point = self._points.get(serial)
        if point is None:
            raise ActionError(ActionErrorKind.NOT_FOUND, f"no station {serial}")
        problem = self._usable_controller(controller)
        if problem is not None:
            raise ActionError(ActionErrorKind.BAD_REQUEST, problem)
        old = point.state.config
        if old.controller == controller:
            return
        default = self.settings.controller_of(serial)
        self._store.save_records(
            {
                CONTROLLER_RECORD + serial: None if controller == default else controller,
                MANUAL_RECORD + serial: None,
            }
        )
        self._controllers.pop(serial, None)
        if controller != default:
            self._controllers[serial] = controller
        self._manual_ca.pop(serial, None)
        config = replace(
            old,
            controller=controller,
            contactor_by_request=controller == BRIDGE_MQTT,
            heartbeat=controller != MANUAL,
        )
        point.commit(cp.change_controller(point.state, config, self._clock()))
        self._control.sync(point)
        log.info(
            "station %s (%s): controller %s -> %s", serial, point.name, old.controller, controller
        )

    def _forget_manual(self, serial: str) -> None:
        if self._manual_ca.pop(serial, None) is not None:
            self._store.save_records({MANUAL_RECORD + serial: None})

    def manual(self, serial: str, command: Command) -> None:
        """The owner's command for a station driven by ``manual``, through the control path;
        a current is kept (state file) until changed. Raises Refused or ActionError."""
        point = self._points.get(serial)
        if point is None:
            raise ActionError(ActionErrorKind.NOT_FOUND, f"no station {serial}")
        self._control.execute(MANUAL, [(point, command)], origin="owner")
        if command.kind is Kind.CURRENT:
            self._manual_ca[serial] = int(command.value)
            self._store.save_records({MANUAL_RECORD + serial: int(command.value)})

    # --- energy -----------------------------------------------------------------------------

    def save_energy(self, *, final: bool = False) -> None:
        """Write what changed since the last save to the state file: the energy counters, and
        the last report of each station (plug state, PWM, contactor and its rest, with the
        time), so that a restart shows the plug state held and keeps the contactor's rest.

        Kept: the stations that keep their LP, and any station that has counted energy (a
        new station charging during its probation must not lose that energy); a peer with a
        new serial every few seconds counts none, so it cannot fill the state file.
        """
        if self.store is None:
            return
        worth = {
            serial: point
            for serial, point in self._points.items()
            if serial in self._kept or point.energy_wh > 0
        }
        changed = {
            serial: point.energy_wh
            for serial, point in worth.items()
            if point.energy_wh != self._saved_energy.get(serial)
        }
        if changed:
            self._store.save_energy(changed)
            self._saved_energy.update(changed)
        reports = {}
        for serial, point in worth.items():
            record = self._report_record(point)
            last = self._saved_reports.get(serial)
            if record is not None and (final or last is None or _report_changed(last, record)):
                reports[serial] = record
        if reports:
            self._store.save_records({REPORT_RECORD + s: r for s, r in reports.items()})
            self._saved_reports.update(reports)

    async def save_energy_periodically(self) -> None:
        """Save the energy counters every ``energy_save_interval``; runs until cancelled."""
        while True:
            await asyncio.sleep(self.settings.energy_save_interval)
            try:
                self.save_energy()
            except StoreError as err:  # e.g. a full disk: keep counting, try again next time
                log.error("%s", err)

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Remember and release nothing more (shutdown has begun)."""
        for task in list(self._probations.values()):
            task.cancel()

    def apply(self, change: Callable[[cp.State, float], cp.State]) -> None:
        """Apply a state change to every charge point (shutdown)."""
        now = self._clock()
        for point in self._points.values():
            point.commit(change(point.state, now))


def _report_changed(last: dict[str, Any], new: dict[str, Any]) -> bool:
    """Worth writing: anything but the time changed, or the time by more than 30 s (the held
    plug state is shown for 300 s after ``at``; shutdown writes the exact time)."""
    if any(last.get(k) != v for k, v in new.items() if k != "at"):
        return True
    return abs(float(last.get("at", 0)) - new["at"]) > 30


def _text(peer: Peer | None) -> str | None:
    return None if peer is None else str(peer)
