"""OCPP 1.6J: every station a charge point of a central system (controller kind "ocpp").

Each station with an ``ocpp_url`` keeps one websocket to ``<ocpp_url>/<ocpp_id>`` (subprotocol
``ocpp1.6``), through the ``ocpp`` library, which checks every message against the OCPP JSON
schemas both ways. The station reports BootNotification, Heartbeat, StatusNotification (from
:func:`..view.show`), MeterValues and transactions; a station whose ``controller`` is "ocpp" also
takes the central system's commands, which become :class:`..control.Command` s on the one
control path (never a safety check here). The others answer control requests Rejected.

Transactions: plugging in starts one with ``ocpp_id_tag`` (or a RemoteStart's tag), unplugging
stops it. StartTransaction, StopTransaction and the transaction's MeterValues go through a queue
kept in the state file (records ``ocpp/<serial>/q/...``): while the central system is away, or
across a restart, nothing is lost; they are sent in order, each once it is answered, and the
transaction id the central system gives replaces the local one in what follows.

While the central system is unreachable, the stored charging profiles keep applying (OCPP
3.13); an "ocpp" station starts no new transaction (charging waits) unless
``ocpp_offline_start`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import websockets
from ocpp import messages as ocpp_messages
from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.exceptions import (
    FormationViolationError,
    GenericError,
    OCPPError,
    UnknownCallErrorCodeError,
)
from ocpp.messages import Call, CallError, MessageType, unpack
from ocpp.routing import after, on
from ocpp.v16 import ChargePoint as LibraryChargePoint
from ocpp.v16 import call, call_result
from ocpp.v16.enums import Action

from .. import chargepoint as cp
from ..actions import ActionError
from ..config import Settings
from ..control import LOG_BURST, LOG_PER_SECOND, OCPP, Command, Control, Kind
from ..evse.link import printable
from ..evse.protocol import MAX_FIRMWARE_SIZE
from ..firmware import FirmwareUpdater
from ..ratelimit import RateLimit
from ..registry import Registry
from ..snapshot import OcppSnapshot
from ..store import Store, StoreError
from ..view import FAULT_ERROR, Freshness, next_change, show
from . import ocpp_profiles as prof

log = logging.getLogger(__name__)
# The library logs every frame at INFO (with its payload): only our own lines are wanted.
logging.getLogger("ocpp").setLevel(logging.WARNING)

VENDOR, MODEL = "Dehne", "Dehne-EVSE"  # CiString20 each
MAX_MESSAGE = 64 * 1024  # larger frames close the connection (1009): no OCPP 1.6 call needs one
MAX_QUEUE = 2000  # queued messages per station; the oldest MeterValues give way first
RESPONSE_TIMEOUT = 30.0
NEVER = 10 * 365 * 86400.0  # the "ocpp" controller's heartbeat: its decisions are local
BACKOFF_FIRST = 4.0  # seconds: the first reconnect step (see backoff())
CONNECTOR = 1
MIN_INTERVAL = 1  # seconds: the shortest heartbeat or boot retry interval taken
DOWNLOAD_TIMEOUT = 120.0
FIRMWARE_TIMEOUT = 120.0  # for the station to come back with the new firmware
FIRMWARE_WAIT = 5.0  # how often a downloaded image checks whether charging has ended
MEASURANDS = (
    "Energy.Active.Import.Register",
    "Power.Active.Import",
    "Current.Import",
    "Voltage",
    "Current.Offered",
)
FEATURES = "Core,SmartCharging,RemoteTrigger,FirmwareManagement"


@dataclass
class Key:
    """One configuration key (GetConfiguration / ChangeConfiguration)."""

    value: str
    readonly: bool = False
    check: Callable[[str], bool] | None = None


def _uint(text: str) -> bool:
    return text.isdigit() and int(text) <= 86400


def _measurands(text: str) -> bool:
    items = [m.strip() for m in text.split(",") if m.strip()]
    return all(m in MEASURANDS for m in items)


def _bool_text(text: str) -> bool:
    return text.lower() in ("true", "false")


def default_keys() -> dict[str, Key]:
    """The standard keys this charge point has, with their defaults."""
    return {
        "HeartbeatInterval": Key("300", check=_uint),
        "MeterValueSampleInterval": Key("60", check=_uint),
        "MeterValuesSampledData": Key("Energy.Active.Import.Register", check=_measurands),
        "StopTxnSampledData": Key("", check=_measurands),
        "ClockAlignedDataInterval": Key("0", check=lambda t: t == "0"),
        "MeterValuesAlignedData": Key("", check=_measurands),
        "ConnectionTimeOut": Key("60", check=_uint),
        "WebSocketPingInterval": Key("0", check=_uint),
        "TransactionMessageAttempts": Key("3", check=_uint),
        "TransactionMessageRetryInterval": Key("60", check=_uint),
        "AuthorizeRemoteTxRequests": Key("false", readonly=True),
        "LocalAuthorizeOffline": Key("false", readonly=True),
        "LocalPreAuthorize": Key("false", readonly=True),
        "StopTransactionOnEVSideDisconnect": Key("true", readonly=True),
        "StopTransactionOnInvalidId": Key("true", readonly=True),
        "UnlockConnectorOnEVSideDisconnect": Key("true", readonly=True),
        "NumberOfConnectors": Key("1", readonly=True),
        "SupportedFeatureProfiles": Key(FEATURES, readonly=True),
        "GetConfigurationMaxKeys": Key("50", readonly=True),
        "MeterValuesSampledDataMaxLength": Key(str(len(MEASURANDS)), readonly=True),
        "ChargeProfileMaxStackLevel": Key(str(prof.MAX_STACK_LEVEL), readonly=True),
        "ChargingScheduleAllowedChargingRateUnit": Key("Current,Power", readonly=True),
        "ChargingScheduleMaxPeriods": Key(str(prof.MAX_PERIODS), readonly=True),
        "MaxChargingProfilesInstalled": Key(str(prof.MAX_PROFILES), readonly=True),
        "ResetRetries": Key("0", readonly=True),
        "LocalAuthListEnabled": Key("false", check=lambda t: t.lower() == "false"),
        "StopTxnAlignedData": Key("", check=_measurands),
        "MinimumStatusDuration": Key("0", check=_uint),
    }


@dataclass
class OcppCounters:
    """What the metrics show of the OCPP connections (read on the event loop)."""

    messages: dict[tuple[str, str, str], int] = field(default_factory=dict)  # dir, action, result

    def count(self, direction: str, action: str, result: str) -> None:
        """One message: ``direction`` "in"/"out", its action and result."""
        key = (direction, action, result)
        self.messages[key] = self.messages.get(key, 0) + 1


def _iso(epoch: float) -> str:
    return prof.format_time(epoch)


_ACTIONS = frozenset(a.value for a in Action)


def backoff(attempt: int, cap: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt`` (0: the first after a connection ended).

    The step doubles from :data:`BACKOFF_FIRST` up to ``cap``; the wait is a random part of it
    (jitter), so stations that lost a restarted central system together come back spread over
    the step instead of all at once.
    """
    step = min(cap, BACKOFF_FIRST * 2 ** min(attempt, 30))
    return rng.uniform(0.1 * step, step)


class _Peer(LibraryChargePoint):
    """The ``ocpp`` library's charge point on one websocket; handlers hand over to the link."""

    def __init__(self, link: StationLink, connection: Any) -> None:
        super().__init__(link.ident, connection, response_timeout=link.iface.response_timeout)
        self.link = link
        self.logger = log

    async def route_message(self, raw_msg: str) -> None:
        """As the library's, but a malformed frame is answered with a CallError where it has
        a message id (OCPP-J 4.2.3), and a result nobody waits for is dropped (bounded)."""
        link = self.link
        try:
            msg = unpack(raw_msg)
        except OCPPError as err:
            link.iface.counters.count("in", "?", type(err).__name__)
            unique_id = _unique_id(raw_msg)
            if unique_id is not None:
                error = CallError(unique_id, err.code, err.description, err.details or {})
                await self._send(error.to_json())
            link.warn(f"malformed frame from the central system: {err}")
            return
        if msg.message_type_id == MessageType.Call:
            assert isinstance(msg, Call)
            if not (
                isinstance(msg.unique_id, str)
                and isinstance(msg.action, str)
                and isinstance(msg.payload, dict)
            ):
                # The library takes any JSON there; a list as action would not even hash.
                link.iface.counters.count("in", "unknown", "FormationViolation")
                link.warn("malformed call from the central system: wrong field types")
                if isinstance(msg.unique_id, str) and len(msg.unique_id) <= 36:
                    error = FormationViolationError(description="wrong field types in the call")
                    await self._send(
                        CallError(msg.unique_id, error.code, error.description, {}).to_json()
                    )
                return
            # Only OCPP 1.6's names become labels: a peer's invented ones would grow the metrics.
            action = msg.action if msg.action in _ACTIONS else "unknown"
            try:
                await self._handle_call(msg)
                link.iface.counters.count("in", action, "ok")
            except OCPPError as error:
                link.iface.counters.count("in", action, error.code)
                link.warn(f"{action} from the central system refused: {error.code}")
                await self._send(msg.create_call_error(error).to_json())
            return
        if self._call_lock.locked() and self._response_queue.qsize() < 4:
            self._response_queue.put_nowait(msg)

    async def _send(self, message: str) -> None:
        await self._connection.send(message)

    # --- central system -> charge point ---------------------------------------------------

    @on(Action.remote_start_transaction)
    def on_remote_start(self, id_tag: str, connector_id: int | None = None, **_: Any) -> Any:
        """RemoteStartTransaction."""
        ok = connector_id in (None, CONNECTOR) and self.link.remote_start(id_tag)
        return call_result.RemoteStartTransaction("Accepted" if ok else "Rejected")

    @on(Action.remote_stop_transaction)
    def on_remote_stop(self, transaction_id: int) -> Any:
        """RemoteStopTransaction."""
        ok = self.link.remote_stop(transaction_id)
        return call_result.RemoteStopTransaction("Accepted" if ok else "Rejected")

    @on(Action.set_charging_profile)
    def on_set_profile(self, connector_id: int, cs_charging_profiles: dict[str, Any]) -> Any:
        """SetChargingProfile."""
        # The library decodes numbers as Decimal; the state file takes JSON numbers.
        raw = json.loads(json.dumps(snake_to_camel_case(cs_charging_profiles), default=float))
        return call_result.SetChargingProfile(self.link.set_profile(connector_id, raw))

    @on(Action.clear_charging_profile)
    def on_clear_profile(
        self,
        id: int | None = None,
        connector_id: int | None = None,
        charging_profile_purpose: str | None = None,
        stack_level: int | None = None,
    ) -> Any:
        """ClearChargingProfile."""
        status = self.link.clear_profiles(id, connector_id, charging_profile_purpose, stack_level)
        return call_result.ClearChargingProfile(status)

    @on(Action.get_composite_schedule)
    def on_composite(
        self, connector_id: int, duration: int, charging_rate_unit: str | None = None
    ) -> Any:
        """GetCompositeSchedule."""
        return self.link.composite(connector_id, duration, charging_rate_unit or "A")

    @on(Action.get_configuration)
    def on_get_configuration(self, key: list[str] | None = None) -> Any:
        """GetConfiguration."""
        keys = self.link.keys
        names = key if key else list(keys)
        known = [
            {"key": n, "readonly": keys[n].readonly, "value": keys[n].value}
            for n in names
            if n in keys
        ]
        unknown = [n for n in names if n not in keys]
        return call_result.GetConfiguration(
            configuration_key=known or None, unknown_key=unknown or None
        )

    @on(Action.change_configuration)
    def on_change_configuration(self, key: str, value: str) -> Any:
        """ChangeConfiguration."""
        return call_result.ChangeConfiguration(self.link.change_key(key, value))

    @on(Action.trigger_message)
    def on_trigger(self, requested_message: str, connector_id: int | None = None) -> Any:
        """TriggerMessage."""
        return call_result.TriggerMessage(self.link.trigger(requested_message, connector_id))

    @on(Action.change_availability)
    def on_change_availability(self, connector_id: int, type: str) -> Any:
        """ChangeAvailability."""
        return call_result.ChangeAvailability(self.link.change_availability(connector_id, type))

    @on(Action.reset)
    def on_reset(self, type: str) -> Any:
        """Reset: the transaction ends, the connection starts anew (boot)."""
        return call_result.Reset("Accepted" if self.link.reset(type) else "Rejected")

    @after(Action.reset)
    def after_reset(self, type: str) -> None:
        """Close the connection once the answer is out: the link reconnects and boots."""
        self.link.reconnect_now()

    @on(Action.update_firmware)
    def on_update_firmware(
        self,
        location: str,
        retrieve_date: str,
        retries: int | None = None,
        retry_interval: int | None = None,
    ) -> Any:
        """UpdateFirmware: answered at once; download and update follow, reported with
        FirmwareStatusNotification."""
        self.link.update_firmware(location, retrieve_date, retries or 1, retry_interval or 30)
        return call_result.UpdateFirmware()

    @on(Action.unlock_connector)
    def on_unlock(self, connector_id: int) -> Any:
        """UnlockConnector: a Dehne-EVSE has no lock actuator."""
        return call_result.UnlockConnector("NotSupported")

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any) -> Any:
        """DataTransfer: no vendor extensions."""
        return call_result.DataTransfer("UnknownVendorId")

    @on(Action.clear_cache)
    def on_clear_cache(self) -> Any:
        """ClearCache: there is no authorization cache."""
        return call_result.ClearCache("Accepted")

    @on(Action.get_local_list_version)
    def on_local_list_version(self) -> Any:
        """GetLocalListVersion: no local list (-1: not supported, OCPP 1.6 5.9)."""
        return call_result.GetLocalListVersion(-1)

    @on(Action.send_local_list)
    def on_send_local_list(self, **_: Any) -> Any:
        """SendLocalList: not supported."""
        return call_result.SendLocalList("NotSupported")

    @on(Action.reserve_now)
    def on_reserve_now(self, **_: Any) -> Any:
        """ReserveNow: reservations are not supported."""
        return call_result.ReserveNow("Rejected")

    @on(Action.cancel_reservation)
    def on_cancel_reservation(self, reservation_id: int) -> Any:
        """CancelReservation: there are none."""
        return call_result.CancelReservation("Rejected")


def _unique_id(raw: str) -> str | None:
    """The message id of a frame that did not parse, if it has one to answer."""
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    # A broken result or error is not answered (that could ping-pong); anything else is.
    if (
        isinstance(frame, list)
        and len(frame) >= 2
        and frame[0] not in (MessageType.CallResult, MessageType.CallError)
    ):
        unique_id = frame[1]
        if isinstance(unique_id, str) and len(unique_id) <= 36:
            return unique_id
    return None


class StationLink:
    """One station's OCPP identity: its websocket, queue, transaction, profiles and keys."""

    def __init__(self, iface: OcppInterface, point: cp.ChargePoint, url: str) -> None:
        self.iface = iface
        self.point = point
        self.serial = point.identity.serial
        station = iface.settings.station_by_serial(self.serial)
        self.ident = (station.ocpp_id if station else None) or point.name
        self.password = station.ocpp_password if station else None
        self.url = f"{url}/{self.ident}"
        self.controls = point.state.config.controller == OCPP
        self.up = False
        self.reconnects = 0
        self.prefix = f"ocpp/{self.serial}/"
        self.keys = default_keys()
        self.queue: list[tuple[str, dict[str, Any]]] = []  # (record key or "", item)
        self.seq = 0
        self.tx: dict[str, Any] | None = None
        self.ids: dict[str, int] = {}  # local transaction -> the central system's id
        self.available = True
        self.profiles: list[prof.Profile] = []
        self.remote_tag: str | None = None
        self.finished = False  # stopped remotely while still plugged in
        self.plugged = False
        self.sent_status: dict[int, tuple[str, str]] = {}
        self.triggers: set[str] = set()
        self.wake = asyncio.Event()
        self._interval_changed = asyncio.Event()
        self.firmware_status = "Idle"
        self._firmware_task: asyncio.Task[None] | None = None
        self._peer: _Peer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._view_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: str = ""
        self._log_limit = RateLimit(LOG_PER_SECOND, LOG_BURST)
        self._load()

    # --- state file ---------------------------------------------------------------------

    def _load(self) -> None:
        store = self.iface.store
        records = store.records(self.prefix) if store is not None else {}
        state = records.get(self.prefix + "state") or {}
        self.seq = int(state.get("seq", 0))
        self.tx = state.get("tx")
        self.ids = {str(k): int(v) for k, v in (state.get("ids") or {}).items()}
        self.available = bool(state.get("available", True))
        self.finished = bool(state.get("finished", False))
        for name, value in (state.get("keys") or {}).items():
            if name in self.keys and not self.keys[name].readonly:
                self.keys[name].value = str(value)
        now = self.iface.wall()
        for raw in records.get(self.prefix + "profiles") or []:
            try:
                self.profiles.append(prof.parse(int(raw.pop("_connector")), raw, now))
            except (prof.ProfileError, KeyError, ValueError, TypeError) as err:
                log.warning("%s: a stored charging profile is dropped: %s", self.ident, err)
        queued = sorted(k for k in records if k.startswith(self.prefix + "q/"))
        self.queue = [(k, records[k]) for k in queued]
        if self.tx is not None:
            self.plugged = True  # as when it was saved; the first change event says otherwise

    def _save_state(self) -> None:
        state = {
            "seq": self.seq,
            "tx": self.tx,
            "ids": self.ids,
            "available": self.available,
            "finished": self.finished,
            "keys": {n: k.value for n, k in self.keys.items() if not k.readonly},
        }
        profiles = [
            {**p.raw, "_connector": p.connector, "_installedAt": p.installed_at}
            for p in self.profiles
        ]
        self.iface.save({self.prefix + "state": state, self.prefix + "profiles": profiles})

    def _enqueue(self, action: str, payload: dict[str, Any], *, tx: str | None, keep: bool) -> None:
        """Queue a message; ``keep``: in the state file too (transaction messages)."""
        if len(self.queue) >= MAX_QUEUE:
            drop = next(
                (i for i, (_, item) in enumerate(self.queue) if item["action"] == "MeterValues"),
                None,
            )
            if drop is None:
                log.error("%s: the OCPP queue is full; %s is dropped", self.ident, action)
                return
            key, _ = self.queue.pop(drop)
            if key:
                self.iface.save({key: None})
        item = {"action": action, "payload": payload, "tx": tx}
        key = ""
        if keep:
            self.seq += 1
            key = f"{self.prefix}q/{self.seq:012d}"
            self.iface.save({key: item})
        self.queue.append((key, item))
        self.wake.set()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background), sample meter values, apply the stored profiles."""
        self._tasks = [
            asyncio.create_task(self._run(), name=f"ocpp {self.ident}"),
            asyncio.create_task(self._sample(), name=f"ocpp meter {self.ident}"),
        ]
        self.changed()

    async def stop(self) -> None:
        """Close the connection; the queue stays in the state file."""
        for timer in (self._timer, self._view_timer):
            if timer is not None:
                timer.cancel()
        tasks = [*self._tasks, *([self._firmware_task] if self._firmware_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def warn(self, text: str) -> None:
        """A peer-caused warning: once until it changes, and at most a burst, then one per
        second (a central system sending garbage must not flood the log)."""
        if text == self._warned:
            return
        self._warned = text
        if self._log_limit.allow(self.iface.clock()):
            log.warning("%s: %s%s", self.ident, printable(text[:300]), self._log_limit.left_out())

    def reconnect_now(self) -> None:
        """Close the websocket; the connection loop reconnects (Reset)."""
        peer = self._peer
        if peer is not None:
            self.iface.background(peer._connection.close())

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                async with websockets.connect(
                    self.url,
                    subprotocols=[websockets.Subprotocol("ocpp1.6")],
                    additional_headers=self._headers(),
                    ssl=self.iface.ssl_context if self.url.startswith("wss:") else None,
                    max_size=MAX_MESSAGE,
                    max_queue=4,
                    open_timeout=10,
                    ping_interval=None,
                    compression=None,
                ) as ws:
                    attempt = 0
                    await self._session(ws)
            except asyncio.CancelledError:
                raise
            except (OSError, websockets.WebSocketException, TimeoutError) as err:
                self.warn(f"central system at {self.url}: {err or type(err).__name__}")
            except OCPPError as err:  # e.g. an answer that breaks the schema: start anew
                self.warn(f"central system at {self.url}: {err.code}: {err.description}")
            except Exception:  # a bug must not end the station's OCPP connection for good
                log.exception("%s: OCPP connection failed", self.ident)
            finally:
                self.up = False
                self._peer = None
            self.reconnects += 1
            await asyncio.sleep(
                backoff(attempt, self.iface.settings.ocpp_reconnect_max, self.iface.random)
            )
            attempt += 1

    def _headers(self) -> dict[str, str]:
        if not self.password:
            return {}
        token = base64.b64encode(f"{self.ident}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def _session(self, ws: Any) -> None:
        peer = self._peer = _Peer(self, ws)
        reader = asyncio.create_task(peer.start())
        sender = asyncio.create_task(self._send_loop(peer))
        try:
            done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
        finally:
            for task in (reader, sender):
                task.cancel()
            await asyncio.gather(reader, sender, return_exceptions=True)

    async def _call(self, peer: _Peer, payload: Any) -> Any:
        action = type(payload).__name__
        try:
            result = await peer.call(payload, suppress=False)
        except UnknownCallErrorCodeError as err:  # a plain Exception in the library
            self.iface.counters.count("out", action, "unknown_error_code")
            raise GenericError(description=str(err)) from None
        except OCPPError as err:
            self.iface.counters.count("out", action, err.code)
            raise
        self.iface.counters.count("out", action, "ok")
        return result

    async def _send_loop(self, peer: _Peer) -> None:
        interval = await self._boot(peer)
        self.up = True
        self._warned = ""
        log.info("%s: connected to the central system at %s", self.ident, self.url)
        self.sent_status.clear()
        self.changed()
        beat_at = time.monotonic() + interval
        while True:
            self.wake.clear()
            await self._send_statuses(peer)
            await self._flush(peer)
            for trigger in sorted(self.triggers):
                self.triggers.discard(trigger)
                await self._triggered(peer, trigger)
            interval = max(MIN_INTERVAL, int(self.keys["HeartbeatInterval"].value) or interval)
            if time.monotonic() >= beat_at:
                await self._call(peer, call.Heartbeat())
                beat_at = time.monotonic() + interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, beat_at - time.monotonic()))

    async def _boot(self, peer: _Peer) -> int:
        while True:
            session = self.iface.registry.session(self.serial)
            firmware = session.firmware if session is not None else None
            result = await self._call(
                peer,
                call.BootNotification(
                    charge_point_model=MODEL,
                    charge_point_vendor=VENDOR,
                    charge_point_serial_number=self.point.identity.serial_number[:25],
                    charge_box_serial_number=self.serial[-25:],
                    firmware_version=str(firmware) if firmware is not None else None,
                ),
            )
            # 0 or less: the charge point chooses; a tiny one must not make a heartbeat flood.
            interval = int(result.interval)
            interval = max(MIN_INTERVAL, interval if interval > 0 else 300)
            if result.status == "Accepted":
                self.keys["HeartbeatInterval"].value = str(interval)
                return interval
            # Pending/Rejected: only BootNotification again after the interval (OCPP 4.2).
            await asyncio.sleep(interval)

    # --- status -------------------------------------------------------------------------

    def status(self) -> tuple[str, str, str]:
        """(status, errorCode, info) of the connector, from the view."""
        shown = show(self.point, self.iface.clock())
        if not self.available:
            return "Unavailable", "NoError", ""
        if shown.fault == FAULT_ERROR:
            if shown.freshness is Freshness.FRESH:
                return "Faulted", "EVCommunicationError", shown.fault_text[:50]
            return "Unavailable", "NoError", shown.fault_text[:50]
        if not shown.plugged:
            return "Available", "NoError", ""
        if self.tx is None:
            return ("Finishing" if self.finished else "Preparing"), "NoError", ""
        if shown.charging:
            return "Charging", "NoError", ""
        if shown.offered_a > 0:
            return "SuspendedEV", "NoError", ""
        return "SuspendedEVSE", "NoError", ""

    async def _send_statuses(self, peer: _Peer) -> None:
        connector0 = ("Available" if self.available else "Unavailable", "NoError", "")
        for connector, (status, code, info) in ((0, connector0), (CONNECTOR, self.status())):
            if self.sent_status.get(connector) == (status, code):
                continue
            await self._call(
                peer,
                call.StatusNotification(
                    connector_id=connector,
                    error_code=code,
                    status=status,
                    timestamp=_iso(self.iface.wall()),
                    info=info or None,
                ),
            )
            self.sent_status[connector] = (status, code)

    # --- the queue ----------------------------------------------------------------------

    async def _flush(self, peer: _Peer) -> None:
        while self.queue:
            key, item = self.queue[0]
            action, payload, local = item["action"], dict(item["payload"]), item.get("tx")
            if local is not None and action != "StartTransaction":
                if local not in self.ids:
                    self._done(key, "its transaction was never started at the central system")
                    continue
                payload["transactionId"] = self.ids[local]
            message = getattr(call, action)(**camel_to_snake_case(payload))
            try:
                result = await self._call(peer, message)
            except OCPPError as err:
                # A CallError is the central system's final word on this message.
                self._done(key, f"{action} answered {err.code}: {err.description}")
                continue
            if action == "StartTransaction":
                self._started(local, result)
            elif action == "StopTransaction":
                self.ids.pop(local, None)
                self._save_state()
            self._done(key, None)

    def _done(self, key: str, problem: str | None) -> None:
        self.queue.pop(0)
        if key:
            self.iface.save({key: None})
        if problem:
            log.warning("%s: %s; dropped", self.ident, problem)

    def _started(self, local: str, result: Any) -> None:
        self.ids[local] = int(result.transaction_id)
        status = (result.id_tag_info or {}).get("status", "Invalid")
        if self.tx is not None and self.tx["local"] == local:
            self.tx["id"] = int(result.transaction_id)
            self.tx["authorised"] = status == "Accepted"
            if status != "Accepted":
                log.warning(
                    "%s: the central system refused id tag %s (%s)",
                    self.ident,
                    self.tx["tag"],
                    status,
                )
                self._end("DeAuthorized")
        self._save_state()
        self.apply()

    # --- transactions -------------------------------------------------------------------

    def _begin(self, tag: str) -> None:
        local = f"{self.serial[-8:]}-{self.seq + 1}"
        wall = self.iface.wall()
        meter = int(self.point.energy_wh)
        offline_ok = not self.controls or self.iface.settings.ocpp_offline_start
        self.tx = {
            "local": local,
            "id": None,
            "tag": tag,
            "start": wall,
            "meter": meter,
            "authorised": not self.controls or (not self.up and offline_ok),
        }
        self.finished = False
        self._enqueue(
            "StartTransaction",
            {"connectorId": CONNECTOR, "idTag": tag, "meterStart": meter, "timestamp": _iso(wall)},
            tx=local,
            keep=True,
        )
        self._save_state()
        log.info("%s: transaction %s started (id tag %s, %d Wh)", self.ident, local, tag, meter)

    def _end(self, reason: str) -> None:
        tx = self.tx
        if tx is None:
            return
        meter = int(self.point.energy_wh)
        self._enqueue(
            "StopTransaction",
            {
                "meterStop": meter,
                "timestamp": _iso(self.iface.wall()),
                "transactionId": 0,
                "reason": reason,
                "idTag": tx["tag"],
            },
            tx=tx["local"],
            keep=True,
        )
        self.tx = None
        self._save_state()
        log.info("%s: transaction %s stopped (%s, %d Wh)", self.ident, tx["local"], reason, meter)

    def remote_start(self, tag: str) -> bool:
        """RemoteStartTransaction: start now if plugged in, else with the next plug-in."""
        if not self.controls or not self.available or self.tx is not None:
            return False
        if self.plugged:
            self._begin(tag)
            self.apply()
        else:
            self.remote_tag = tag
        return True

    def remote_stop(self, transaction_id: int) -> bool:
        """RemoteStopTransaction of the running transaction."""
        if not self.controls or self.tx is None or self.tx.get("id") != transaction_id:
            return False
        self._end("Remote")
        self.finished = True
        self._save_state()
        self.apply()
        return True

    # --- change events and the current -------------------------------------------------

    def changed(self) -> None:
        """The charge point changed (or time passed): transactions, the current, the status."""
        if self.iface.closing:
            return
        now = self.iface.clock()
        shown = show(self.point, now)
        plugged = shown.plugged
        self._watch_view(now)
        if self.point.state.data_at is None:
            # Just started: no word from the station yet. A transaction from before the restart
            # stays open until the station says whether the vehicle is still there.
            plugged = self.plugged
        if plugged != self.plugged:
            self.plugged = plugged
            if not plugged:
                self.finished = False
                self._end("EVDisconnected")
        if (
            plugged
            and self.tx is None
            and not self.finished
            and self.available
            and (self.up or not self.controls or self.iface.settings.ocpp_offline_start)
        ):
            self._begin(self.remote_tag or self.iface.settings.ocpp_id_tag)
            self.remote_tag = None
        self.apply()
        self.wake.set()

    def _watch_view(self, now: float) -> None:
        """Look again when the view changes by time alone (the plug hold runs out)."""
        if self._view_timer is not None:
            self._view_timer.cancel()
            self._view_timer = None
        when = next_change(self.point, now)
        if when is not None:
            loop = asyncio.get_running_loop()
            self._view_timer = loop.call_later(when - now + 0.001, self.changed)

    def apply(self) -> None:
        """Set the current the profiles allow now (``ocpp`` stations), and the next check."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.controls or self.iface.closing:
            return
        wall = self.iface.wall()
        tx = self.tx
        allowed = self.available and tx is not None and tx.get("authorised", False)
        ca = 0
        if allowed:
            assert tx is not None
            limit = prof.limit_at(
                self.profiles,
                wall,
                phases=self.point.state.config.phases,
                tx_id=tx.get("id"),
                tx_start=tx.get("start"),
            )
            amps = self.point.state.config.max_current_a if limit.amps is None else limit.amps
            ca = min(int(amps * 100), cp.MAX_CURRENT_CA)
            if ca < cp.MIN_CURRENT_CA:
                ca = 0  # below 6 A a vehicle cannot charge: the schedule pauses it
        if ca != self.point.state.requested_ca:
            with contextlib.suppress(cp.Refused):  # counted and logged by the control path
                self.iface.control.execute(
                    OCPP, [(self.point, Command(Kind.CURRENT, ca))], origin=f"ocpp {self.ident}"
                )
        following = prof.next_change(self.profiles, wall, tx_start=tx.get("start") if tx else None)
        if following is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, following - wall) + 0.001, self.apply)

    # --- profiles -----------------------------------------------------------------------

    def set_profile(self, connector: int, raw: dict[str, Any]) -> str:
        """SetChargingProfile: Accepted or Rejected."""
        if not self.controls or connector not in (0, CONNECTOR):
            return "Rejected"
        try:
            profile = prof.parse(connector, raw, self.iface.wall())
            if profile.purpose == prof.TX and (
                self.tx is None
                or (
                    profile.transaction_id is not None
                    and profile.transaction_id != self.tx.get("id")
                )
            ):
                raise prof.ProfileError("a TxProfile needs its running transaction")
            self.profiles = prof.install(self.profiles, profile)
        except prof.ProfileError as err:
            self.iface.control.refused(
                OCPP,
                "bad_value",
                f"{self.ident}: SetChargingProfile rejected: {err}",
                key=f"ocpp {self.ident}",
            )
            return "Rejected"
        self._save_state()
        self.apply()
        return "Accepted"

    def clear_profiles(
        self, id: int | None, connector: int | None, purpose: str | None, level: int | None
    ) -> str:
        """ClearChargingProfile: Accepted if any was cleared, else Unknown."""
        kept = prof.clear(
            self.profiles, id=id, connector=connector, purpose=purpose, stack_level=level
        )
        if len(kept) == len(self.profiles):
            return "Unknown"
        self.profiles = kept
        self._save_state()
        self.apply()
        return "Accepted"

    def composite(self, connector: int, duration: int, unit: str) -> Any:
        """GetCompositeSchedule."""
        if connector not in (0, CONNECTOR) or not self.controls:
            return call_result.GetCompositeSchedule("Rejected")
        wall = self.iface.wall()
        tx = self.tx or {}
        periods = prof.composite(
            self.profiles,
            wall,
            duration,
            phases=self.point.state.config.phases,
            tx_id=tx.get("id"),
            tx_start=tx.get("start"),
            unit=unit,
        )
        if not periods:
            limit = self.point.state.config.max_current_a
            if unit == "W":
                limit *= prof.NOMINAL_VOLTAGE * self.point.state.config.phases
            periods = [prof.Period(0, limit)]
        schedule = {
            "duration": duration,
            "startSchedule": _iso(wall),
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": [
                {"startPeriod": int(p.start), "limit": p.limit}
                | ({"numberPhases": p.phases} if p.phases else {})
                for p in periods
            ],
        }
        return call_result.GetCompositeSchedule(
            "Accepted",
            connector_id=connector,
            schedule_start=_iso(wall),
            charging_schedule=schedule,
        )

    # --- configuration, triggers, availability ------------------------------------------

    def change_key(self, name: str, value: str) -> str:
        """ChangeConfiguration: Accepted, Rejected (read-only, bad value) or NotSupported."""
        key = self.keys.get(name)
        if key is None:
            return "NotSupported"
        if key.readonly or (key.check is not None and not key.check(value)):
            return "Rejected"
        key.value = value
        if name == "MeterValueSampleInterval":
            self._interval_changed.set()
        self._save_state()
        self.wake.set()
        return "Accepted"

    def trigger(self, message: str, connector: int | None) -> str:
        """TriggerMessage: Accepted (sent after the answer) or NotImplemented."""
        if connector not in (None, 0, CONNECTOR):
            return "Rejected"
        if message not in (
            "BootNotification",
            "Heartbeat",
            "StatusNotification",
            "MeterValues",
            "FirmwareStatusNotification",
        ):
            return "NotImplemented"
        self.triggers.add(message)
        self.wake.set()
        return "Accepted"

    async def _triggered(self, peer: _Peer, message: str) -> None:
        if message == "BootNotification":
            await self._boot(peer)
        elif message == "Heartbeat":
            await self._call(peer, call.Heartbeat())
        elif message == "StatusNotification":
            self.sent_status.clear()
            await self._send_statuses(peer)
        elif message == "MeterValues":
            await self._call(
                peer,
                call.MeterValues(
                    connector_id=CONNECTOR,
                    meter_value=[self._sample_now("Trigger")],
                    transaction_id=(self.tx or {}).get("id"),
                ),
            )
        elif message == "FirmwareStatusNotification":
            await self._call(peer, call.FirmwareStatusNotification(status=self.firmware_status))

    def change_availability(self, connector: int, kind: str) -> str:
        """ChangeAvailability: Inoperative stops charging the safe way and stays, also across
        a restart; with a transaction running it is Scheduled (after the transaction)."""
        if not self.controls or connector not in (0, CONNECTOR):
            return "Rejected"
        available = kind == "Operative"
        if available == self.available:
            return "Accepted"
        self.available = available
        scheduled = not available and self.tx is not None
        if scheduled:
            # Charging stops now the safe way; the transaction ends as well (no current).
            self._end("Other")
        self._save_state()
        self.changed()
        return "Accepted"

    def reset(self, kind: str) -> bool:
        """Reset: the running transaction ends; the connection is opened anew."""
        self._end("HardReset" if kind == "Hard" else "SoftReset")
        self.apply()
        return True

    # --- firmware -----------------------------------------------------------------------

    def _firmware_status(self, status: str) -> None:
        self.firmware_status = status
        log.info("%s: firmware %s", self.ident, status)
        self._enqueue("FirmwareStatusNotification", {"status": status}, tx=None, keep=False)

    def update_firmware(self, location: str, retrieve: str, retries: int, interval: int) -> None:
        """Download the image at ``location`` (from ``retrieve`` on), then update the station
        with the operator's firmware update (it waits until the station is not charging)."""
        if self._firmware_task is not None and not self._firmware_task.done():
            self.warn("UpdateFirmware while an update runs: ignored")
            return
        if not self.controls:
            # Only the controller may take a station out of service for an update.
            self._firmware_status("InstallationFailed")
            return
        self._firmware_task = asyncio.create_task(
            self._update_firmware(location, retrieve, min(retries, 5), min(interval, 3600))
        )

    async def _update_firmware(
        self, location: str, retrieve: str, retries: int, interval: int
    ) -> None:
        try:
            when = prof.parse_time(retrieve)
        except prof.ProfileError:
            when = self.iface.wall()
        await asyncio.sleep(max(0.0, when - self.iface.wall()))
        image = None
        for attempt in range(retries):
            if attempt:
                await asyncio.sleep(interval)
            self._firmware_status("Downloading")
            try:
                image = await download(location, MAX_FIRMWARE_SIZE)
                break
            except DownloadError as err:
                self.warn(f"firmware download from {location} failed: {err}")
        if image is None:
            self._firmware_status("DownloadFailed")
            return
        self._firmware_status("Downloaded")
        while cp.busy(self.point.state):  # never while charging
            await asyncio.sleep(FIRMWARE_WAIT)
        self._firmware_status("Installing")
        try:
            await self.iface.firmware.update(self.serial, image, FIRMWARE_TIMEOUT)
        except ActionError as err:
            self.warn(f"firmware update failed: {err}")
            self._firmware_status("InstallationFailed")
            return
        self._firmware_status("Installed")

    # --- meter values -------------------------------------------------------------------

    def _sample_now(self, context: str) -> dict[str, Any]:
        shown = show(self.point, self.iface.clock())
        wanted = [
            m.strip() for m in self.keys["MeterValuesSampledData"].value.split(",") if m.strip()
        ] or ["Energy.Active.Import.Register"]
        values: list[dict[str, Any]] = []

        def add(measurand: str, value: float, unit: str, phase: str | None = None) -> None:
            # No location: Outlet is the spec's default, and central systems key by it so.
            item = {
                "value": f"{value:.1f}",
                "context": context,
                "measurand": measurand,
                "unit": unit,
            }
            if phase:
                item["phase"] = phase
            values.append(item)

        for measurand in wanted:
            if measurand == "Energy.Active.Import.Register":
                add(measurand, shown.energy_wh, "Wh")
            elif measurand == "Power.Active.Import":
                add(measurand, shown.power_w, "W")
            elif measurand == "Current.Import":
                for n, amps in enumerate(shown.currents_a, 1):
                    add(measurand, amps, "A", f"L{n}")
            elif measurand == "Voltage":
                for n, volts in enumerate(shown.voltages_v, 1):
                    if volts is not None:
                        add(measurand, volts, "V", f"L{n}-N")
            elif measurand == "Current.Offered":
                add(measurand, shown.offered_a, "A")
        return {"timestamp": _iso(self.iface.wall()), "sampledValue": values}

    async def _sample(self) -> None:
        while True:
            interval = int(self.keys["MeterValueSampleInterval"].value)
            self._interval_changed.clear()
            # A new interval applies at once, not after the old one has run out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interval_changed.wait(), interval or None)
                continue
            sample = self._sample_now("Sample.Periodic")
            if self.tx is not None:
                self._enqueue(
                    "MeterValues",
                    {"connectorId": CONNECTOR, "meterValue": [sample], "transactionId": 0},
                    tx=self.tx["local"],
                    keep=True,
                )
            elif self.up:
                self._enqueue(
                    "MeterValues",
                    {"connectorId": CONNECTOR, "meterValue": [sample]},
                    tx=None,
                    keep=False,
                )


class DownloadError(Exception):
    """A firmware image could not be fetched."""


async def download(location: str, limit: int) -> bytes:
    """The image at ``location`` (http or https), at most ``limit`` bytes."""
    if not location.startswith(("http://", "https://")):
        raise DownloadError("only http:// and https:// locations are supported")
    timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(location) as response,
        ):
            if response.status != 200:
                raise DownloadError(f"HTTP {response.status}")
            image = await response.content.read(limit + 1)
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        raise DownloadError(str(err) or type(err).__name__) from None
    if len(image) > limit:
        raise DownloadError(f"the image is larger than {limit} bytes")
    if not image:
        raise DownloadError("the image is empty")
    return image


class OcppInterface:
    """The OCPP links of every station with an ``ocpp_url``."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        control: Control,
        clock: Callable[[], float],
        firmware: FirmwareUpdater,
        wall: Callable[[], float] = time.time,
        response_timeout: float = RESPONSE_TIMEOUT,
    ) -> None:
        self.settings, self.registry, self.control = settings, registry, control
        self.clock, self.wall = clock, wall
        self.firmware = firmware
        self.response_timeout = response_timeout
        self.counters = OcppCounters()
        self.random = random.Random()  # the reconnect jitter
        self.links: dict[str, StationLink] = {}
        self.store: Store | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if any(u.startswith("wss:") for u in self._urls()):
            self.ssl_context = ssl.create_default_context(cafile=settings.ocpp_ca_file or None)
        # The "ocpp" controller's decisions are the stored profiles, which OCPP keeps executing
        # while the central system is away: its heartbeat never lapses.
        self.heartbeat = control.add_heartbeat(OCPP, NEVER, what="OCPP")
        # The library validates each message in a worker thread: for frames of at most
        # MAX_MESSAGE bytes the thread hop costs more than the check (SetChargingProfile ->
        # PWM p99 9.5 -> see make bench), and a thread pool adds no bound of its own.
        ocpp_messages.ASYNC_VALIDATION = False
        self._running = False
        self.closing = False
        self._background: set[asyncio.Future[Any]] = set()
        registry.subscribe(self._changed)

    def _urls(self) -> list[str]:
        urls = [self.settings.ocpp_url] + [s.ocpp_url or "" for s in self.settings.station]
        return [u for u in urls if u]

    def save(self, records: dict[str, Any]) -> None:
        """Write records to the state file; a failure is logged (the queue stays in memory)."""
        if self.store is None:
            return
        try:
            self.store.save_records(records)
        except StoreError as err:
            log.error("%s", err)

    def start(self) -> None:
        """Connect every station's link (the registry is loaded)."""
        self.store = self.registry.store
        self._running = True
        self._changed(self.registry.points())

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` on its own; a reference is kept until it is done."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        """Take no more commands and set no more currents (shutdown has begun); transactions
        stay open in the state file."""
        self.closing = True

    async def stop(self) -> None:
        """Close every link."""
        self._running = False
        links = list(self.links.values())
        self.links.clear()
        await asyncio.gather(*(link.stop() for link in links))

    def _changed(self, points: list[cp.ChargePoint]) -> None:
        if not self._running or self.closing:
            return
        for point in points:
            serial = point.identity.serial
            link = self.links.get(serial)
            if self.registry.get(serial) is not point:  # dropped
                if link is not None:
                    del self.links[serial]
                    self.background(link.stop())
                continue
            if link is None:
                url = self.settings.ocpp_url_of(serial)
                configured = self.settings.station_by_serial(serial) is not None
                # A station nobody named and nobody serves (held, or no LP left) stays unknown.
                if not url or (point.identity.lp is None and not configured):
                    continue
                link = self.links[serial] = StationLink(self, point, url)
                link.start()
            else:
                link.changed()

    def snapshot(self, point: cp.ChargePoint) -> OcppSnapshot | None:
        """The OCPP connection of ``point`` (None: it has none)."""
        link = self.links.get(point.identity.serial)
        if link is None:
            return None
        tx = link.tx
        return OcppSnapshot(
            ident=link.ident,
            url=link.url,
            up=link.up,
            reconnects=link.reconnects,
            queued=len(link.queue),
            status=link.status()[0],
            transaction=None if tx is None else str(tx.get("id") or tx["local"]),
        )

    def messages(self) -> tuple[tuple[str, str, str, int], ...]:
        """The message counters, frozen."""
        return tuple((*key, n) for key, n in sorted(self.counters.messages.items()))

    def queued(self) -> int:
        """Messages waiting for the central systems."""
        return sum(len(link.queue) for link in self.links.values())
