"""The composition root: builds every part of the service, starts and stops them in one order.

The data flow: stations (evse/link) -> charge points (registry, chargepoint) -> control path and
view -> interfaces (Modbus, openWB MQTT, Rust-bridge MQTT, OCPP, HTTP). Start-up: state file, charge
points, station link, Modbus, MQTT, OCPP, HTTP, timers. Shutdown: no more commands from anyone, stop
charging on every station the safe way (if configured), tell the MQTT controllers, close the
stations' sessions, save energy.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from . import chargepoint as cp
from .config import EVERYONE, ConfigError, Settings
from .control import MODBUS, Control
from .dimming import HTTP as DIM_HTTP
from .dimming import MQTT as DIM_MQTT
from .dimming import Dimming
from .evse.link import StationLink
from .evse.neighbours import mac_of
from .firmware import FirmwareUpdater
from .heartbeat import Heartbeat
from .history import RECORD as HISTORY_RECORD
from .history import SAVE_INTERVAL as HISTORY_SAVE_INTERVAL
from .history import PowerHistory
from .interfaces.bridge_mqtt import RustBridgeApi
from .interfaces.homeassistant import HomeAssistantApi
from .interfaces.http.actions import AdminApi
from .interfaces.http.origin import own_names
from .interfaces.http.server import MAX_CONNECTIONS as HTTP_MAX_CONNECTIONS
from .interfaces.http.server import WebServer
from .interfaces.metrics import Metrics
from .interfaces.modbus.server import WRITE_CODES, ChargePointServer, ModbusObserver
from .interfaces.ocpp import OcppInterface
from .interfaces.openwb_mqtt import OpenWbSecondary
from .interfaces.site_mqtt import SiteMqtt
from .limits import FD_RESERVE, ConnectionLimiter, Network, raise_fd_limit
from .mqtt.connection import MqttConnection, MqttSettings
from .phaseswitch import PhaseSwitcher
from .ratelimit import left_out_totals
from .registry import Registry
from .snapshot import HeartbeatSnapshot, MqttSnapshot, PointSnapshot, Snapshot, SupplySnapshot
from .store import Store, StoreError
from .supply import SupplyLimit
from .view import HeartbeatInfo, show

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 2.0  # extra seconds, beyond stop_timeout, to wait for contactors on shutdown


class _RequestObserver(ModbusObserver):
    """Every Modbus response is counted; one to a client that may write refreshes the heartbeat.

    The heartbeat means "the controller is alive": a read-only client (outside
    ``modbus_write_allow``) never keeps charging going, and once an address has written, only
    requests from addresses that have written count, so a dashboard polling the registers does
    not keep charging alive after the controller died. Until anyone writes, any request counts
    (openWB's rule).
    """

    def __init__(self, heartbeat: Heartbeat, metrics: Metrics) -> None:
        self._heartbeat, self._metrics = heartbeat, metrics
        self.writers: set[str] = set()  # addresses that have written successfully

    def response(
        self, function_code: int, exception_code: int | None, controller: bool, host: str
    ) -> None:
        if controller:
            if function_code in WRITE_CODES and exception_code is None:
                self.writers.add(host)
            if not self.writers or host in self.writers:
                self._heartbeat.refresh(host)
        self._metrics.response(function_code, exception_code)


def _who(networks: tuple[Network, ...]) -> str:
    if set(networks) >= set(EVERYONE):
        return "everyone"
    return ", ".join(str(n) for n in networks) or "no one"


def _where(host: str) -> str:
    return "every interface" if host in ("", "0.0.0.0", "::") else host


def access_summary(s: Settings) -> list[str]:
    """Who may connect and who may write, for the log at start-up (the first hour's surprise:
    the defaults let everyone on the network write)."""
    stations = (
        "only stations in [[station]] or known_stations are served"
        if s.unknown_stations == "hold"
        else "any station is served"
    )
    lines = [f"access: stations connect on {_where(s.evse_host)}:{s.evse_port}; {stations}"]
    if s.modbus_port:
        lines.append(
            f"access: Modbus on {_where(s.modbus_host)}:{s.modbus_port}: "
            f"{_who(s.modbus_allow)} may connect, {_who(s.modbus_write_allow)} may write "
            "(set currents, phases, pilot interruptions)"
            + (
                "; restrict with modbus_allow / modbus_write_allow"
                if set(s.modbus_write_allow) >= set(EVERYONE)
                else ""
            )
        )
    if s.mqtt_host:
        lines.append(
            f"access: MQTT broker {s.mqtt_host}:{s.mqtt_port}: whoever may publish there "
            "drives the stations whose controller is openwb-mqtt or bridge-mqtt"
        )
    if s.metrics_port:
        actions = (
            "actions (owner's controls, move, forget, firmware) need the admin token"
            if s.admin_token
            else "actions are off (no admin_token)"
        )
        lines.append(
            f"access: HTTP on {_where(s.metrics_host)}:{s.metrics_port}: everyone may read the "
            f"status page and /metrics; {actions}"
        )
    return lines


class Service:
    """The running service."""

    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = s = settings
        self.clock = clock or asyncio.get_running_loop().time
        self.metrics = Metrics()
        self.control = Control(self.clock, lambda: self.registry.points(), self.metrics)
        self.registry = Registry(s, self.control, self.clock)
        # A shared supply: fixed (supply_max_current) or dimmable (a dimming source configured).
        self.supply = SupplyLimit(s.supply_max_current) if s.supply_shared else None
        if self.supply is not None:
            self.registry.subscribe(lambda _: self.balance_supply())  # first: sessions act on it
        self.phase_switcher = PhaseSwitcher(s, self.clock, self.metrics.phase_switch)
        self.registry.subscribe(self.phase_switcher.changed)
        self.link = StationLink(
            s.evse_host,
            s.evse_port,
            poll_interval=s.poll_interval,
            attach=self.registry.attach,
            calibration_for=self.registry.calibration,
            address_for=self.registry.address,
            recognises=self.registry.recognises,
            neighbours=mac_of,
            observer=self.metrics,
            limiter=ConnectionLimiter(
                "evse", s.evse_max_connections, s.evse_max_per_address, observer=self.metrics
            ),
        )
        self.firmware = FirmwareUpdater(self.registry, self.clock)
        # The Modbus heartbeat; it applies to the charge points whose controller is "modbus".
        self.modbus_heartbeat = self.control.add_heartbeat(
            MODBUS, s.heartbeat_timeout, what="Modbus request"
        )
        self.modbus: ChargePointServer | None = None
        self.mqtt: MqttConnection | None = None
        self.openwb: OpenWbSecondary | None = None
        self.bridge_mqtt: RustBridgeApi | None = None
        self.homeassistant: HomeAssistantApi | None = None
        service_id = f"{socket.gethostname()}-{s.evse_port}"
        if s.mqtt_host:
            self.mqtt = MqttConnection(
                MqttSettings(
                    s.mqtt_host, s.mqtt_port, s.mqtt_username, s.mqtt_password, s.mqtt_ca_file
                ),
                # Two services on one host and broker must not take over each other's session.
                client_id=f"openwb-modbus-evse-{service_id}",
            )
            self.openwb = OpenWbSecondary(s, self.registry, self.control, self.mqtt, self.clock)
            if s.bridge_topics:
                self.bridge_mqtt = RustBridgeApi(
                    s, self.registry, self.control, self.mqtt, self.clock
                )
                self.link.listeners.append(self.bridge_mqtt)
        # --- OCPP: every station with an ocpp_url is a charge point of a central system ---
        self.ocpp: OcppInterface | None = None
        if s.ocpp_url or any(st.ocpp_url for st in s.station):
            self.ocpp = OcppInterface(s, self.registry, self.control, self.clock, self.firmware)
        # Home Assistant: MQTT discovery of every station, and the "homeassistant" controller.
        if self.mqtt is not None and s.ha_discovery:
            self.homeassistant = HomeAssistantApi(
                s, self.registry, self.control, self.mqtt, self.clock, service_id
            )
        # --- grid operator dimming (§14a EnWG): a runtime limit on the shared supply ---------
        self.dimming: Dimming | None = None
        self.site_mqtt: SiteMqtt | None = None
        if s.dim_sources:
            assert self.supply is not None
            self.dimming = Dimming(s, self.supply, self.balance_supply)
            if self.mqtt is not None and DIM_MQTT in s.dim_sources:
                self.site_mqtt = SiteMqtt(s, self.control, self.dimming, self.mqtt)
        # --------------------------------------------------------------------------------------
        self.history = PowerHistory()
        self.web: WebServer | None = None
        self.metrics_port = 0  # where the HTTP server (/metrics, page, API) listens; 0: off
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._running = False  # start() completed

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state file and start listening; raises StoreError, ConfigError or OSError."""
        s = self.settings
        self._check_fd_budget()
        self.registry.load(Store(s.state_db))
        if self.dimming is not None:
            assert self.registry.store is not None
            self.dimming.load(self.registry.store)  # kept limits hold before a station connects
        await self.link.start()
        if s.modbus_port:
            self.modbus = ChargePointServer(
                self.registry.at,
                self.clock,
                self.control,
                unit_id=s.unit_id,
                observer=_RequestObserver(self.modbus_heartbeat, self.metrics),
                limiter=ConnectionLimiter(
                    "modbus",
                    s.modbus_max_connections,
                    s.modbus_max_per_address,
                    allow=s.modbus_allow,
                    observer=self.metrics,
                ),
                write_allow=s.modbus_write_allow,
                idle_timeout=s.modbus_idle_timeout,
            )
            await self.modbus.start(s.modbus_host, s.modbus_port)
        if self.mqtt is not None:
            assert self.openwb is not None
            self.openwb.start()
            if self.homeassistant is not None:
                self.homeassistant.start()
            await self.mqtt.start()  # connects in the background: a broker that is away is no error
        if self.ocpp is not None:
            self.ocpp.start()  # connects in the background: a central system away is no error
        if s.metrics_port:
            dimming = self.dimming if DIM_HTTP in s.dim_sources else None
            admin = AdminApi(self.registry, self.firmware, s.admin_token, dimming)
            hosts = own_names(s.http_hosts)
            self.web = WebServer(self.snapshot, self.metrics, admin, hosts)
            self.metrics_port = await self.web.start(s.metrics_host, s.metrics_port)
        self._tasks = [
            asyncio.create_task(self.control.watch()),
            asyncio.create_task(self.registry.save_energy_periodically()),
        ]
        if self.web is not None:
            assert self.registry.store is not None
            self.history.load(self.registry.store.records(HISTORY_RECORD))
            self._tasks.append(asyncio.create_task(self._sample_power()))
        if self.supply is not None:
            self._tasks.append(asyncio.create_task(self._balance_supply_periodically()))
        if self.dimming is not None and s.dim_command:
            self._tasks.append(asyncio.create_task(self.dimming.poll()))
        self._running = True
        for line in access_summary(s):
            log.info("%s", line)

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

    async def stop(self) -> None:
        """Stop charging safely (if configured), save energy, close everything; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # No controller may start charging again meanwhile, nor an operator act.
        if self.modbus is not None:
            await self.modbus.stop()
        if self.web is not None:
            await self.web.stop()
        if self.openwb is not None:
            self.openwb.close()
        if self.bridge_mqtt is not None:
            self.bridge_mqtt.close()
        if self.ocpp is not None:
            self.ocpp.close()
        if self.homeassistant is not None:
            self.homeassistant.close()
        if self.site_mqtt is not None:
            self.site_mqtt.close()
        self.registry.close()  # nothing is remembered or released while shutting down
        await self.phase_switcher.stop()  # a relay command in flight is abandoned (and killed)
        # A station counts as settled only once a report after our last command shows it: one
        # that applied a current a moment ago may still report PWM 100 % from before.
        unconfirmed = self.registry.unconfirmed
        if self.settings.stop_charging_on_shutdown:
            await self._settle(
                cp.shut_down,
                lambda p, _: cp.not_stopped(p.state) or unconfirmed(p),
                "confirm the stop",
            )
        else:
            await self._settle(
                cp.leave_charging,
                lambda p, now: cp.pwm_not_applied(p.state, now) or unconfirmed(p),
                "apply its PWM",
            )
        if self.openwb is not None:
            await self.openwb.stop()  # the primary reads "stopped" (fault 2), not stale values
        if self.homeassistant is not None:
            await self.homeassistant.stop()  # its entities become unavailable
        if self.mqtt is not None:
            await self.mqtt.stop()
        if self.ocpp is not None:
            await self.ocpp.stop()  # its queue stays in the state file
        await self.link.close()
        self.registry.save_energy(final=True)
        if self.web is not None:
            self.history.seal()
            self.save_history()
        if self.registry.store is not None:
            self.registry.store.close()
        if self._running:
            log.info("stopped")

    async def _settle(
        self,
        change: Callable[[cp.State, float], cp.State],
        busy: Callable[[cp.ChargePoint, float], bool],
        what: str,
    ) -> None:
        """Apply ``change`` to every charge point, then wait until no station is ``busy``."""
        self.registry.apply(change)
        limit = self.clock() + self.settings.stop_timeout + SHUTDOWN_GRACE
        while True:
            now = self.clock()
            waiting = [p.name for p in self.registry.points() if busy(p, now)]
            if not waiting:
                return
            if now >= limit:
                break
            await asyncio.sleep(0.1)
        log.warning("shutdown: %s did not %s in time", ", ".join(waiting), what)

    # --- time-driven work -------------------------------------------------------------------

    def balance_supply(self) -> None:
        """Share the supply limit among the charge points again (if there is one)."""
        if self.supply is not None:
            self.supply.balance(self.registry.points(), self.clock())

    async def _balance_supply_periodically(self) -> None:
        # Turns, idle vehicles and stations gone for good change with time alone.
        while True:
            await asyncio.sleep(1.0)
            self.balance_supply()

    async def _sample_power(self) -> None:
        saved = self.clock()
        while True:
            now = self.clock()
            powers = []
            for point in self.registry.points():
                shown = show(point, now)
                powers.append((point.identity.serial, shown.power_w if shown.data else None))
            self.history.sample(powers, time.time())
            if now - saved >= HISTORY_SAVE_INTERVAL:  # in batches: not with every sample
                saved = now
                self.save_history()
            await asyncio.sleep(self.history.interval)

    def save_history(self) -> None:
        """Write the power history's changed minutes to the state file (a batch)."""
        store = self.registry.store
        if store is None:
            return
        records = self.history.changed_records()
        if not records:
            return
        try:
            store.save_records(records)
        except StoreError as err:  # e.g. a full disk: the chart goes on, saved next time
            self.history.unsaved(records)
            log.error("%s", err)

    # --- what the HTTP side encodes ---------------------------------------------------------

    def limiters(self) -> list[ConnectionLimiter]:
        """The connection limiters of the listeners that run."""
        found = [self.link.limiter]
        if self.modbus is not None:
            found.append(self.modbus.limiter)
        if self.web is not None and self.web.gate is not None:
            found.append(self.web.gate.limiter)
        return found

    def snapshot(self) -> Snapshot:
        """Everything /metrics and /api/status show, frozen (taken on the event loop)."""
        control = self.control
        points = []
        for point in self.registry.points():
            session = self.registry.session(point.identity.serial)
            heartbeat = control.heartbeat_of(point)
            points.append(
                PointSnapshot(
                    identity=point.identity,
                    state=point.state,
                    energy_wh=point.energy_wh,
                    max_data_age=point.max_data_age,
                    implausible_reports=point.implausible_reports,
                    recent_log=tuple(point.recent_log),
                    firmware=session.firmware if session else None,
                    heartbeat_age_s=heartbeat.age() if heartbeat else None,
                    history=self.history.series(point.identity.serial),
                    heartbeat=(
                        HeartbeatInfo(
                            heartbeat.what,
                            heartbeat.age(),
                            heartbeat.timeout,
                            heartbeat.received,
                            heartbeat.source,
                        )
                        if heartbeat
                        else None
                    ),
                    last_disconnect=point.last_disconnect,
                    session_wh=point.session_wh,
                    ocpp=self.ocpp.snapshot(point) if self.ocpp is not None else None,
                    claim=self.registry.claim_text(point.identity.serial),
                )
            )
        mqtt = self.mqtt
        return Snapshot(
            now=self.clock(),
            wall=time.time(),
            points=tuple(points),
            heartbeats=tuple(
                HeartbeatSnapshot(
                    e.controller,
                    e.scope,
                    e.heartbeat.age(),
                    e.heartbeat.lapsed,
                    e.heartbeat.lapses,
                    e.heartbeat.recoveries,
                    e.heartbeat.source,
                )
                for e in control.heartbeats
            ),
            mqtt=(
                MqttSnapshot(
                    mqtt.connected, mqtt.messages_in, mqtt.messages_out, mqtt.messages_dropped
                )
                if mqtt is not None
                else None
            ),
            sessions=len(self.link.sessions),
            connections=tuple((limiter.listener, limiter.open) for limiter in self.limiters()),
            history_interval_s=self.history.bucket,
            supply_limit_a=self.settings.supply_max_current or None,
            log_lines_left_out=tuple(sorted(left_out_totals().items())),
            ocpp_messages=self.ocpp.messages() if self.ocpp is not None else (),
            supply=self._supply_snapshot(),
        )

    def _supply_snapshot(self) -> SupplySnapshot | None:
        supply = self.supply
        if supply is None:
            return None
        amps = lambda ca: None if ca is None else ca / 100  # noqa: E731
        limits = self.dimming.limits if self.dimming is not None else {}
        return SupplySnapshot(
            in_use_a=amps(supply.limit_ca),
            max_current_a=amps(supply.max_ca),
            dimming_a=amps(supply.dim_ca),
            floor_a=supply.floor_ca / 100,
            sources=tuple((source, ca / 100) for source, ca in sorted(limits.items())),
        )
