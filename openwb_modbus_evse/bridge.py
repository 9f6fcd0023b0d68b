"""Builds and runs the whole service: station link, charge points, Modbus server, MQTT, metrics.

Start-up order: state file, charge points, station link, Modbus server, MQTT, metrics.
Shutdown: stop charging on every station the safe way (if configured), save energy, close
everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

from . import chargepoint as cp
from .actions import ActionError, ActionErrorKind
from .config import MAX_LP, ConfigError, Settings, StationConfig
from .evse.link import Session, SessionClosed, StationLink
from .evse.protocol import MAX_FIRMWARE_SIZE, NO_CALIBRATION, StationCalibration
from .heartbeat import Heartbeat
from .limits import FD_RESERVE, ConnectionLimiter, raise_fd_limit
from .metrics import Metrics
from .modbus.server import ChargePointServer, ModbusObserver
from .mqtt.connection import MqttConnection, MqttSettings
from .mqtt.openwb import OpenWbSecondary
from .mqtt.rust_bridge import CONTROLLER as BRIDGE_MQTT
from .mqtt.rust_bridge import RustBridgeApi
from .phaseswitch import run_switch_command
from .ratelimit import RateLimit
from .store import Store, StoreError
from .supply import SupplyLimit
from .web.server import MAX_CONNECTIONS as HTTP_MAX_CONNECTIONS
from .web.server import WebServer

log = logging.getLogger(__name__)

STALE_POLLS = 3  # data older than this many poll intervals counts as none
SHUTDOWN_GRACE = 2.0  # extra seconds, beyond stop_timeout, to wait for contactors on shutdown
# Energy counted by stations that left before their LP was remembered, kept in memory (not in
# the state file) so a new station that reconnects within its first minute does not restart at
# 0; only this many, the oldest forgotten first, so random serials cannot grow it.
RELEASED_ENERGY_KEPT = 32


class _RequestObserver(ModbusObserver):
    """Every Modbus response is counted; one to a client that may write refreshes the heartbeat.

    A read-only client (outside ``modbus_write_allow``) cannot keep charging going after the
    controller that set the current has gone.
    """

    def __init__(self, heartbeat: Heartbeat, metrics: Metrics) -> None:
        self._heartbeat, self._metrics = heartbeat, metrics

    def response(self, function_code: int, exception_code: int | None, controller: bool) -> None:
        if controller:
            self._heartbeat.refresh()
        self._metrics.response(function_code, exception_code)

    def refused(self, kind: cp.RefusalKind) -> None:
        self._metrics.command_refused("modbus", kind.value)


class Bridge:
    """The running service."""

    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.clock = clock or asyncio.get_running_loop().time
        self.charge_points: dict[str, cp.ChargePoint] = {}  # by station serial
        self._by_lp: dict[int, cp.ChargePoint] = {}
        self._stored_energy: dict[str, float] = {}  # as loaded at start, for stations to come
        self._saved_energy: dict[str, float] = {}  # what the state file holds
        # Stations whose charge point stays when they disconnect: configured, or LP remembered.
        # Any other charge point lives only while its station is connected.
        self._kept: set[str] = set()
        self._probations: dict[str, asyncio.Task[None]] = {}
        self._released_energy: OrderedDict[str, float] = OrderedDict()
        # Lines about stations that are not (yet) remembered: a peer that connects with a new
        # serial every few milliseconds must not write two log lines each time.
        self._newcomer_log = RateLimit(per_second=0.1, burst=20)
        self.metrics = Metrics(self)
        # The Modbus heartbeat; it applies to the charge points whose controller is "modbus".
        self.heartbeat = Heartbeat(
            settings.heartbeat_timeout, self.clock, self._modbus_heartbeat_changed
        )
        # Per controller: the heartbeat that applies to a charge point it drives. Interfaces add
        # theirs; without one (None) the charge point counts as lapsed.
        self.heartbeats: dict[str, Callable[[cp.ChargePoint], Heartbeat | None]] = {
            "modbus": lambda _: self.heartbeat
        }
        # Called after every change of a charge point (interfaces that publish state).
        self.change_listeners: list[Callable[[cp.ChargePoint], None]] = []
        self.store: Store | None = None
        self.link = StationLink(
            settings.evse_host,
            settings.evse_port,
            poll_interval=settings.poll_interval,
            attach=self._attach,
            calibration_for=self._calibration,
            address_for=self._address,
            observer=self.metrics,
            limiter=ConnectionLimiter(
                "evse",
                settings.evse_max_connections,
                settings.evse_max_per_address,
                observer=self.metrics,
            ),
        )
        self.modbus: ChargePointServer | None = None
        # MQTT interfaces subscribe and add their wills here before start(); None = MQTT off.
        self.mqtt: MqttConnection | None = None
        if settings.mqtt_host:
            self.mqtt = MqttConnection(
                MqttSettings(
                    settings.mqtt_host,
                    settings.mqtt_port,
                    settings.mqtt_username,
                    settings.mqtt_password,
                    settings.mqtt_ca_file,
                ),
                # Two services on one host and broker must not take over each other's session.
                client_id=f"openwb-modbus-evse-{socket.gethostname()}-{settings.evse_port}",
            )
        self.web: WebServer | None = None
        self.openwb = OpenWbSecondary(self, self.mqtt) if self.mqtt is not None else None
        self.supply = (
            SupplyLimit(settings.supply_max_current) if settings.supply_max_current else None
        )
        self.rust_bridge: RustBridgeApi | None = None
        if self.mqtt is not None and settings.bridge_topics:
            self.rust_bridge = RustBridgeApi(self, self.mqtt)
        self.metrics_port = 0  # where the HTTP server (/metrics, page, API) listens; 0: off
        self._tasks: list[asyncio.Task[None]] = []
        self._switches: dict[str, asyncio.Task[None]] = {}
        self._updates: set[str] = set()  # serials with a firmware update running
        self._stopped = False
        self._running = False  # start() completed

    # --- charge points ----------------------------------------------------------------------

    def charge_point_at(self, lp: int) -> cp.ChargePoint | None:
        """The charge point served as LP ``lp``."""
        return self._by_lp.get(lp)

    def limiters(self) -> list[ConnectionLimiter]:
        """The connection limiters of the listeners that run."""
        found = [self.link.limiter]
        if self.modbus is not None:
            found.append(self.modbus.limiter)
        if self.web is not None and self.web.gate is not None:
            found.append(self.web.gate.limiter)
        return found

    def _calibration(self, serial: str) -> StationCalibration:
        station = self.settings.station_by_serial(serial)
        return station.calibration if station else NO_CALIBRATION

    def _address(self, serial: str) -> IPv4Network | IPv6Network | None:
        station = self.settings.station_by_serial(serial)
        return station.address if station else None

    def _new_charge_point(self, serial: str, lp: int | None, energy_wh: float) -> cp.ChargePoint:
        station = self.settings.station_by_serial(serial) or StationConfig(serial=serial)
        controller = self.settings.controller_of(serial)
        identity = cp.Identity(
            serial=serial,
            lp=lp,
            name=self._display_name(serial, lp),
            serial_number=station.serial_number or serial[-20:],
        )
        config = cp.ChargePointConfig(
            max_current_a=station.max_current,
            cable=station.cable,
            phases=station.phases,
            can_switch_phases=station.phase_switch_command is not None,
            stop_timeout=self.settings.stop_timeout,
            phase_switch_pause=self.settings.phase_switch_pause,
            controller=controller,
            supply_limited=self.supply is not None,
            contactor_min_off=self.settings.contactor_min_off,
            contactor_by_request=controller == BRIDGE_MQTT,
        )
        point = cp.ChargePoint(
            identity,
            config,
            energy_wh=energy_wh,
            max_data_age=STALE_POLLS * self.settings.poll_interval,
        )
        self.charge_points[serial] = point
        if lp is not None:
            self._by_lp[lp] = point
        self._sync_heartbeat(point)
        return point

    def _display_name(self, serial: str, lp: int | None) -> str:
        station = self.settings.station_by_serial(serial)
        return (station.name if station else None) or (f"LP{lp}" if lp else cp.short_serial(serial))

    def _sync_heartbeat(self, point: cp.ChargePoint) -> None:
        """Take over the lapse state of the heartbeat that now applies to ``point``."""
        heartbeat = self.heartbeat_of(point)
        lapsed = heartbeat is None or heartbeat.lapsed
        point.commit(cp.set_heartbeat_lapsed(point.state, lapsed, self.clock()))

    def heartbeat_of(self, point: cp.ChargePoint) -> Heartbeat | None:
        """The heartbeat of the controller that drives the charge point (None: it has none)."""
        return self.heartbeats.get(point.state.config.controller, lambda _: None)(point)

    def _load_charge_points(self, store: Store) -> None:
        """Configured stations, then remembered ones, each on its LP (block served at once)."""
        energy = self._stored_energy = store.energy_wh()
        self._saved_energy = dict(energy)
        for station in self.settings.station:
            if station.lp is not None:  # else: its remembered LP below, or one when it connects
                self._new_charge_point(station.serial, station.lp, energy.get(station.serial, 0.0))
                self._kept.add(station.serial)
        configured_lps = {s.lp for s in self.settings.station if s.lp is not None}
        for serial, lp in sorted(store.lp_assignments().items(), key=lambda kv: kv[1]):
            if serial in self.charge_points:
                continue
            if lp in configured_lps or not 1 <= lp <= MAX_LP:
                log.info("station %s: LP%d is configured for another station now", serial, lp)
                store.forget_lp(serial)
                continue
            self._new_charge_point(serial, lp, energy.get(serial, 0.0))
            self._kept.add(serial)

    def _charge_point_for(self, serial: str) -> cp.ChargePoint:
        point = self.charge_points.get(serial)
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
            return self._new_charge_point(serial, None, energy)
        lp = next((n for n in range(1, MAX_LP + 1) if n not in self._by_lp), None)
        if lp is None:
            log.warning(
                "station %s: all %d LPs are taken; it is kept safe, not served", serial, MAX_LP
            )
            return self._new_charge_point(serial, None, energy)
        point = self._new_charge_point(serial, lp, energy)
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

    def _log_newcomer(self, level: int, message: str, *args: object) -> None:
        if self._newcomer_log.allow(self.clock()):
            dropped = self._newcomer_log.take_dropped()
            more = f" ({dropped} such lines left out before)" if dropped else ""
            log.log(level, message + "%s", *args, more)

    def _remember(self, point: cp.ChargePoint) -> None:
        """Keep ``point`` and its LP, also across restarts."""
        serial, lp = point.identity.serial, point.identity.lp
        assert self.store is not None and lp is not None
        self._kept.add(serial)
        try:
            self.store.assign_lp(serial, lp)
        except StoreError as err:  # served and kept all the same; only a restart forgets it
            log.error("%s", err)
            return
        log.info("station %s is LP%d from now on", serial, lp)

    async def _probation(self, session: Session, point: cp.ChargePoint) -> None:
        """Remember a new station's LP once it stayed with valid data; release it if it left."""
        serial = point.identity.serial
        wait = self.settings.lp_remember_after
        try:
            while True:
                try:
                    await asyncio.wait_for(session.wait_closed(), wait)
                except TimeoutError:
                    fresh = cp.fresh_data(point.state, self.clock(), point.max_data_age)
                    if fresh is not None and point.identity.lp is not None:
                        self._remember(point)
                        return
                    wait = self.settings.poll_interval  # connected, but no valid data (yet)
                    continue
                break
            if serial not in self._kept and serial not in self.link.sessions:
                self._release(point)
        finally:
            if self._probations.get(serial) is asyncio.current_task():
                del self._probations[serial]

    def _release(self, point: cp.ChargePoint) -> None:
        """Forget a charge point that never earned its LP: memory, metrics, LP all freed."""
        serial, lp = point.identity.serial, point.identity.lp
        if self.charge_points.get(serial) is not point:
            return
        del self.charge_points[serial]
        if lp is not None and self._by_lp.get(lp) is point:
            del self._by_lp[lp]
            self._log_newcomer(
                logging.INFO,
                "station %s left before its LP was remembered: LP%d is free",
                serial,
                lp,
            )
        if point.energy.wh > 0:
            self._released_energy[serial] = point.energy.wh
            while len(self._released_energy) > RELEASED_ENERGY_KEPT:
                self._released_energy.popitem(last=False)

    def _attach(self, session: Session) -> cp.ChargePoint:
        assert session.serial is not None
        point = self._charge_point_for(session.serial)
        if session.serial not in self._kept:
            previous = self._probations.pop(session.serial, None)
            if previous is not None:
                previous.cancel()
            self._probations[session.serial] = asyncio.create_task(self._probation(session, point))

        def changed() -> None:
            self.balance_supply()  # first: the session acts on the new grants
            session.wake()
            for listener in self.change_listeners:
                listener(point)
            seq = point.state.sequence
            if seq is not None and seq.stage is cp.Stage.READY:
                self._start_phase_switch(point)

        point.on_change = changed
        return point

    # --- LP assignment (operator actions) ---------------------------------------------------

    def stations(self) -> list[dict[str, object]]:
        """Every station the bridge knows (connected or remembered), in LP order."""
        assert self.store is not None
        remembered = self.store.lp_assignments()
        points = sorted(self.charge_points.values(), key=lambda p: p.identity.lp or MAX_LP + 1)
        return [
            {
                "serial": p.identity.serial,
                "lp": p.identity.lp,
                "name": p.name,
                "connected": p.state.connected,
                "charging": _busy(p),
                "configured": self.settings.station_by_serial(p.identity.serial) is not None,
                "remembered": p.identity.serial in remembered,
            }
            for p in points
        ]

    def _movable(self, serial: str, what: str) -> cp.ChargePoint:
        point = self.charge_points.get(serial)
        if point is None:
            raise ActionError(ActionErrorKind.NOT_FOUND, f"no station {serial}")
        station = self.settings.station_by_serial(serial)
        if station is not None and station.lp is not None:
            raise ActionError(
                ActionErrorKind.CONFLICT,
                f"{what} refused: station {serial} is set to LP{station.lp} in the config file",
            )
        if _busy(point):
            raise ActionError(
                ActionErrorKind.CONFLICT, f"{what} refused: {point.name} is charging; stop it first"
            )
        return point

    def move_station(self, serial: str, lp: int) -> None:
        """Serve the station as LP ``lp`` (a free one) from now on, also after restarts."""
        if not 1 <= lp <= MAX_LP:
            raise ActionError(ActionErrorKind.BAD_REQUEST, f"LP must be 1..{MAX_LP}, got {lp}")
        point = self._movable(serial, "move")
        holder = self._by_lp.get(lp)
        if holder is point:
            return
        if holder is not None:
            raise ActionError(ActionErrorKind.CONFLICT, f"LP{lp} is taken by {holder.name}")
        assert self.store is not None
        self.store.assign_lp(serial, lp)
        self._kept.add(serial)  # an operator's choice: no probation
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
        point.commit(cp.reassign(point.state, self.clock()))
        self._sync_heartbeat(point)
        log.info("station %s is LP%d from now on (moved by an operator)", serial, lp)

    def forget_station(self, serial: str) -> None:
        """Drop a station that is not connected: its LP is free again (its energy is kept)."""
        point = self._movable(serial, "forget")
        if point.state.connected:
            raise ActionError(
                ActionErrorKind.CONFLICT,
                f"forget refused: {point.name} is connected; only a station that is gone can be "
                "forgotten",
            )
        assert self.store is not None
        self.save_energy()  # should it come back, it continues its counter
        self._stored_energy[serial] = point.energy.wh
        self.store.forget_lp(serial)
        self._kept.discard(serial)
        del self.charge_points[serial]
        if point.identity.lp is not None:
            del self._by_lp[point.identity.lp]
        log.info("station %s (%s) forgotten by an operator", serial, point.name)

    # --- firmware update (operator action) ---------------------------------------------------

    async def update_firmware(self, serial: str, image: bytes, timeout: float) -> dict[str, object]:
        """Send ``image`` to a station that is not charging; done once it has reconnected.

        LP, energy counter and settings belong to the charge point, which outlives the session.
        """
        if not image:
            raise ActionError(ActionErrorKind.BAD_REQUEST, "the firmware image is empty")
        if len(image) > MAX_FIRMWARE_SIZE:
            raise ActionError(
                ActionErrorKind.TOO_LARGE,
                f"the image has {len(image)} bytes; a station holds at most {MAX_FIRMWARE_SIZE}",
            )
        point = self.charge_points.get(serial)
        if point is None:
            raise ActionError(ActionErrorKind.NOT_FOUND, f"no station {serial}")
        session = self.link.sessions.get(serial)
        if session is None:
            raise ActionError(ActionErrorKind.CONFLICT, f"{point.name} is not connected")
        if serial in self._updates:
            raise ActionError(ActionErrorKind.CONFLICT, f"an update of {point.name} is running")

        def check() -> None:
            if _busy(point):
                raise ActionError(
                    ActionErrorKind.CONFLICT,
                    f"firmware update refused: {point.name} is charging or its contactor is "
                    "closed; stop it first",
                )

        check()
        if point.identity.lp is not None and serial not in self._kept:
            self._remember(point)  # an operator updates it: it keeps its LP across the restart
        self._updates.add(serial)
        try:
            started = self.clock()
            try:
                await session.upload_firmware(image, check)
            except SessionClosed as err:
                raise ActionError(ActionErrorKind.FAILED, f"connection lost: {err}") from None
            log.info("station %s: firmware image of %d bytes sent", point.name, len(image))
            while self.clock() - started < timeout:
                current = self.link.sessions.get(serial)
                if current is not None and current is not session:
                    return {
                        "firmware_before": session.firmware,
                        "firmware_after": current.firmware,
                        "seconds": round(self.clock() - started, 1),
                    }
                await asyncio.sleep(0.05)
        finally:
            self._updates.discard(serial)
        if not session.closed:
            raise ActionError(
                ActionErrorKind.FAILED,
                f"{point.name} did not restart within {timeout:g} s: it is still connected, so "
                "it probably refused the image",
            )
        raise ActionError(
            ActionErrorKind.FAILED,
            f"{point.name} dropped the connection and did not come back within {timeout:g} s",
        )

    # --- shared supply ----------------------------------------------------------------------

    def balance_supply(self) -> None:
        """Share the supply limit among the charge points again (if there is one)."""
        if self.supply is not None:
            self.supply.balance(self.charge_points.values(), self.clock())

    async def _balance_supply_periodically(self) -> None:
        # Turns, idle vehicles and stations gone for good change with time alone.
        while True:
            await asyncio.sleep(1.0)
            self.balance_supply()

    # --- heartbeat and phase switch ---------------------------------------------------------

    def _modbus_heartbeat_changed(self, lapsed: bool) -> None:
        self.apply_heartbeat(
            lapsed,
            (p for p in self.charge_points.values() if p.state.config.controller == "modbus"),
        )

    def apply_heartbeat(self, lapsed: bool, points: Iterable[cp.ChargePoint]) -> None:
        """A controller's heartbeat lapsed or recovered: apply it to the points it drives."""
        now = self.clock()
        for point in list(points):
            point.commit(cp.set_heartbeat_lapsed(point.state, lapsed, now))

    def _start_phase_switch(self, point: cp.ChargePoint) -> None:
        serial = point.identity.serial
        if serial in self._switches:
            return
        point.commit(cp.phase_switch_started(point.state, self.clock()))
        task = asyncio.create_task(self._run_phase_switch(point))
        self._switches[serial] = task
        task.add_done_callback(lambda _: self._switches.pop(serial, None))

    async def _run_phase_switch(self, point: cp.ChargePoint) -> None:
        station = self.settings.station_by_serial(point.identity.serial)
        seq = point.state.sequence
        assert station is not None and station.phase_switch_command and seq and seq.phases
        ok = await run_switch_command(
            station.phase_switch_command, seq.phases, self.settings.phase_switch_timeout, point.name
        )
        self.metrics.phase_switch(ok)
        point.commit(cp.phase_switch_finished(point.state, ok, self.clock()))

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state file and start listening; raises StoreError or OSError."""
        self._check_fd_budget()
        self.store = Store(self.settings.state_db)
        self._load_charge_points(self.store)
        await self.link.start()
        if self.settings.modbus_port:
            self.modbus = ChargePointServer(
                self.charge_point_at,
                self.clock,
                unit_id=self.settings.unit_id,
                observer=_RequestObserver(self.heartbeat, self.metrics),
                limiter=ConnectionLimiter(
                    "modbus",
                    self.settings.modbus_max_connections,
                    self.settings.modbus_max_per_address,
                    allow=self.settings.modbus_allow,
                    observer=self.metrics,
                ),
                write_allow=self.settings.modbus_write_allow,
                idle_timeout=self.settings.modbus_idle_timeout,
            )
            await self.modbus.start(self.settings.modbus_host, self.settings.modbus_port)
        if self.mqtt is not None:
            assert self.openwb is not None
            self.openwb.start()
            if self.rust_bridge is not None:
                self.rust_bridge.start()
            await self.mqtt.start()  # connects in the background: a broker that is away is no error
        if self.settings.metrics_port:
            self.web = WebServer(self)
            self.metrics_port = await self.web.start(
                self.settings.metrics_host, self.settings.metrics_port
            )
        self._tasks = [
            asyncio.create_task(self.heartbeat.watch()),
            asyncio.create_task(self._save_energy_periodically()),
        ]
        if self.supply is not None:
            self._tasks.append(asyncio.create_task(self._balance_supply_periodically()))
        self._running = True

    def _check_fd_budget(self) -> None:
        """Every listener's cap must fit into the open-file limit (raised if it can be).

        Otherwise accept() fails with "too many open files" before a cap is reached, for every
        listener at once, and stations cannot reconnect.
        """
        s = self.settings
        needed = s.evse_max_connections + FD_RESERVE
        needed += s.modbus_max_connections if s.modbus_port else 0
        needed += HTTP_MAX_CONNECTIONS if s.metrics_port else 0
        limit = raise_fd_limit(needed)
        if limit < needed:
            raise ConfigError(
                "modbus_max_connections",
                f"the connection caps (evse_max_connections {s.evse_max_connections}, "
                f"modbus_max_connections {s.modbus_max_connections}, {HTTP_MAX_CONNECTIONS} for "
                f"HTTP, {FD_RESERVE} reserved) need {needed} open files, but the limit is "
                f"{limit}: lower the caps or raise LimitNOFILE (ulimit -n)",
            )

    def save_energy(self) -> None:
        """Write the energy counters that changed since the last save to the state file."""
        if self.store is None:
            return
        changed = {
            serial: point.energy.wh
            for serial, point in self.charge_points.items()
            if serial in self._kept and point.energy.wh != self._saved_energy.get(serial)
        }
        if changed:
            self.store.save_energy(changed)
            self._saved_energy.update(changed)

    async def _save_energy_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.energy_save_interval)
            try:
                self.save_energy()
            except StoreError as err:  # e.g. a full disk: keep counting, try again next time
                log.error("%s", err)

    async def stop(self) -> None:
        """Stop charging safely (if configured), save energy, close everything; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.modbus is not None:
            await self.modbus.stop()  # no controller may start charging again meanwhile
        if self.web is not None:
            await self.web.stop()  # nor an action
        if self.openwb is not None:
            self.openwb.close()
        for task in list(self._probations.values()):
            task.cancel()  # nothing is remembered or released while shutting down
        if self.rust_bridge is not None:
            self.rust_bridge.close()
        switches = list(self._switches.values())
        for task in switches:
            task.cancel()  # a relay command in flight is abandoned (and killed)
        await asyncio.gather(*switches, return_exceptions=True)
        if self.settings.stop_charging_on_shutdown:
            await self._settle_for_shutdown(cp.shut_down, _not_stopped, "confirm the stop")
        else:
            await self._settle_for_shutdown(
                cp.leave_charging, lambda p: _pwm_not_applied(p, self.clock()), "apply its PWM"
            )
        if self.openwb is not None:
            await self.openwb.stop()  # the primary reads "stopped" (fault 2), not stale values
        if self.rust_bridge is not None:
            await self.rust_bridge.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        await self.link.close()
        self.save_energy()
        if self.store is not None:
            self.store.close()
        if self._running:
            log.info("stopped")

    async def _settle_for_shutdown(
        self,
        change: Callable[[cp.State, float], cp.State],
        busy: Callable[[cp.ChargePoint], bool],
        what: str,
    ) -> None:
        """Apply ``change`` to every charge point, then wait until no station is ``busy``."""
        now = self.clock()
        for point in self.charge_points.values():
            point.commit(change(point.state, now))
        limit = now + self.settings.stop_timeout + SHUTDOWN_GRACE
        while self.clock() < limit:
            waiting = [p.name for p in self.charge_points.values() if busy(p)]
            if not waiting:
                return
            await asyncio.sleep(0.1)
        log.warning("shutdown: %s did not %s in time", ", ".join(waiting), what)


def _busy(point: cp.ChargePoint) -> bool:
    """The station charges, or its contactor is closed (per its latest data)."""
    data = point.state.data
    return (
        point.state.connected and data is not None and (data.contactor or cp.charging(point.state))
    )


def _pwm_not_applied(point: cp.ChargePoint, now: float) -> bool:
    """A connected station has not yet reported the PWM it should show now."""
    want, data = cp.target(point.state, now), point.state.data
    return want is not None and data is not None and data.pwm != want.pwm


def _not_stopped(point: cp.ChargePoint) -> bool:
    """A connected station still reports a closed contactor or a current offered."""
    data = point.state.data
    return point.state.connected and data is not None and (data.contactor or data.pwm != cp.PWM_OFF)
