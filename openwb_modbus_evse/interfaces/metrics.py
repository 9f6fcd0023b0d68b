"""Prometheus metrics: charge-point values as the view shows them, and service counters.

A scrape renders a :class:`~openwb_modbus_evse.snapshot.Snapshot` taken on the event loop (the
exposition is encoded in a worker thread). Events that are not state (Modbus requests, protocol
errors, command round trips, refusals) are counted here as they happen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..chargepoint import allowed_ca
from ..evse.link import LinkObserver
from ..limits import LimiterObserver
from ..snapshot import Snapshot, SupplySnapshot
from ..view import Freshness, show

disable_created_metrics()  # *_created series only double the counters here

PREFIX = "openwb_modbus_evse"
_CP_LABELS = ["lp", "serial", "name"]
_PILOT_STATES = ("A", "B", "C", "D", "E", "F", "unknown")


class _SnapshotCollector(Collector):
    """Renders the snapshot handed to :meth:`Metrics.exposition`."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        now = snap.now

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=_CP_LABELS + (extra or []))

        voltage = gauge("voltage_volts", "Phase voltage.", ["phase"])
        current = gauge("current_amperes", "Phase current.", ["phase"])
        phase_power = gauge("phase_power_watts", "Phase power (V*I).", ["phase"])
        power = gauge("power_watts", "Total power: sum of V*I over the phases.")
        energy = CounterMetricFamily(
            f"{PREFIX}_energy_imported_joules", "Energy imported.", labels=_CP_LABELS
        )
        plugged = gauge("plugged", "1 if a vehicle is plugged in.")
        charging_ = gauge(
            "charging", "1 if the contactor is closed and the vehicle asks for power."
        )
        requested = gauge("requested_current_amperes", "Current last written by a controller.")
        allowed = gauge(
            "allowed_current_amperes", "Current allowed now (0 during a lapse or a sequence)."
        )
        offered = gauge("offered_current_amperes", "Current the station offers by its PWM.")
        granted = gauge(
            "supply_granted_current_amperes", "Share of supply_max_current granted (if set)."
        )
        pwm = gauge("pwm_duty_cycle_ratio", "PWM duty cycle the station reports (1 = 100 %).")
        contactor = gauge("contactor_closed", "1 if the station reports the contactor closed.")
        pilot = gauge(
            "pilot_state", "Control-pilot state (IEC 61851 letter, or unknown).", ["state"]
        )
        cable = gauge(
            "cable_max_current_amperes", "Cable rating from the proximity pilot (0: none)."
        )
        rssi = gauge("wifi_rssi_dbm", "WiFi signal strength of the station.")
        uptime = gauge(
            "station_uptime_seconds", "Station uptime as it reports it (wraps after ~49.7 days)."
        )
        age = gauge("data_age_seconds", "Age of the station's latest data.")
        connected = gauge("connected", "1 if the station's session is established.")
        implausible = CounterMetricFamily(
            f"{PREFIX}_implausible_reports",
            "Station reports with impossible voltages or currents (ignored, treated as a fault).",
            labels=_CP_LABELS,
        )
        controller = gauge(
            "controller_info", "1, labelled with the interface that drives it.", ["controller"]
        )
        claimed = gauge(
            "unconfirmed_peer",
            "1 while a device elsewhere connects with the station's ID, held until the owner "
            "confirms it.",
        )

        for point in snap.points:
            ident = point.identity
            labels = [str(ident.lp or ""), ident.public_id, ident.name]
            state = point.state
            energy.add_metric(labels, point.energy_wh * 3600)
            requested.add_metric(labels, state.requested_ca / 100)
            allowed.add_metric(labels, allowed_ca(state) / 100)
            connected.add_metric(labels, 1 if state.connected else 0)
            if state.supply_cap_ca is not None:
                granted.add_metric(labels, state.supply_cap_ca / 100)
            implausible.add_metric(labels, point.implausible_reports)
            controller.add_metric([*labels, state.config.controller], 1)
            claimed.add_metric(labels, 0 if point.claim is None else 1)
            if state.data_at is not None:
                age.add_metric(labels, now - state.data_at)
            # What every client is shown, so a sum here is what evcc and Home Assistant sum;
            # an unknown value (a register's -1) is left out.
            shown = show(point, now)
            for i in range(3):
                phase = [*labels, str(i + 1)]
                _add(voltage, phase, shown.voltages_v[i])
                _add(current, phase, shown.currents_a[i])
                _add(phase_power, phase, shown.phase_powers_w[i])
            power.add_metric(labels, shown.power_w)
            plugged.add_metric(labels, int(shown.plugged))
            charging_.add_metric(labels, int(shown.charging))
            offered.add_metric(labels, shown.offered_a)
            data = shown.data
            if shown.freshness is not Freshness.FRESH or data is None:
                continue  # no stale station values: a missing series is what "unknown" looks like
            pwm.add_metric(labels, data.pwm / 100)
            contactor.add_metric(labels, 1 if data.contactor else 0)
            for letter in _PILOT_STATES:
                pilot.add_metric([*labels, letter], 1 if data.pilot.state == letter else 0)
            cable.add_metric(labels, data.proximity.amps or 0)
            rssi.add_metric(labels, data.rssi_dbm)
            # int32 on the wire, wrapping negative after ~24.8 days: read as the uint32 it counts
            uptime.add_metric(labels, (data.uptime_ms % 2**32) / 1000)

        yield from (voltage, current, phase_power, power, energy, plugged, charging_)
        yield from (requested, allowed, offered, granted, pwm, contactor, pilot, cable, rssi)
        yield from (uptime, age, connected, implausible, controller, claimed)

        beat_labels = ["controller", "scope"]
        beat_age = GaugeMetricFamily(
            f"{PREFIX}_heartbeat_age_seconds",
            "Seconds since the controller's last heartbeat (or since start).",
            labels=beat_labels,
        )
        beat_lapsed = GaugeMetricFamily(
            f"{PREFIX}_heartbeat_lapsed",
            "1 while the controller's heartbeat is lapsed (or has not come yet).",
            labels=beat_labels,
        )
        lapses = CounterMetricFamily(
            f"{PREFIX}_heartbeat_lapses", "Heartbeat lapses.", labels=beat_labels
        )
        recoveries = CounterMetricFamily(
            f"{PREFIX}_heartbeat_recoveries", "Heartbeat recoveries.", labels=beat_labels
        )
        source = GaugeMetricFamily(
            f"{PREFIX}_heartbeat_source_info",
            "1, labelled with where the controller's last heartbeat came from (Modbus: the "
            "client address).",
            labels=[*beat_labels, "source"],
        )
        for beat in snap.heartbeats:
            beat_label = [beat.controller, beat.scope]
            if beat.source:
                source.add_metric([*beat_label, beat.source], 1)
            beat_age.add_metric(beat_label, beat.age_s)
            beat_lapsed.add_metric(beat_label, int(beat.lapsed))
            lapses.add_metric(beat_label, beat.lapses)
            recoveries.add_metric(beat_label, beat.recoveries)
        yield from (beat_age, beat_lapsed, lapses, recoveries, source)
        mqtt = snap.mqtt
        if mqtt is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_mqtt_connected",
                "1 while connected to the MQTT broker.",
                int(mqtt.connected),
            )
            for name, doc, value in (
                ("mqtt_messages_received", "MQTT messages received.", mqtt.received),
                ("mqtt_messages_sent", "MQTT messages sent.", mqtt.sent),
                ("mqtt_messages_dropped", "MQTT messages dropped.", mqtt.dropped),
            ):
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        left_out = CounterMetricFamily(
            f"{PREFIX}_log_lines_left_out",
            "Log lines a peer caused that were left out (rate limits), by kind.",
            labels=["kind"],
        )
        for kind, count in snap.log_lines_left_out:
            left_out.add_metric([kind], count)
        yield left_out
        yield from _ocpp_metrics(snap)
        yield GaugeMetricFamily(
            f"{PREFIX}_station_sessions",
            "Stations with an established session.",
            value=snap.sessions,
        )
        connections = GaugeMetricFamily(
            f"{PREFIX}_connections", "Connections open now, by listener.", labels=["listener"]
        )
        for listener, count in snap.connections:
            connections.add_metric([listener], count)
        yield connections
        supply = snap.supply
        if supply is not None:
            yield from _supply_metrics(supply)


def _supply_metrics(supply: SupplySnapshot) -> Iterator[Metric]:
    limits = GaugeMetricFamily(
        f"{PREFIX}_supply_limit_amperes",
        "Limits on the shared supply (A per phase), by source: supply_max_current, a dimming "
        "source (mqtt, http, command), or in_use (what the stations share now).",
        labels=["source"],
    )
    if supply.max_current_a is not None:
        limits.add_metric(["supply_max_current"], supply.max_current_a)
    for source, amps in supply.sources:
        limits.add_metric([source], amps)
    if supply.in_use_a is not None:
        limits.add_metric(["in_use"], supply.in_use_a)
    yield limits
    yield GaugeMetricFamily(
        f"{PREFIX}_supply_dimming_floor_amperes",
        "The §14a floor a dimming limit cannot go below now: 4.2 kW per station that wants "
        "current.",
        value=supply.floor_a,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_supply_dimmed",
        "1 while a grid operator's dimming limit is set.",
        value=int(supply.dimming_a is not None),
    )


def _ocpp_metrics(snap: Snapshot) -> Iterator[Metric]:
    """The OCPP connections: up, reconnects, queue length per station; messages."""
    linked = [p for p in snap.points if p.ocpp is not None]
    if not linked:
        return
    up = GaugeMetricFamily(
        f"{PREFIX}_ocpp_up", "1 while connected to the OCPP central system.", labels=_CP_LABELS
    )
    reconnects = CounterMetricFamily(
        f"{PREFIX}_ocpp_reconnects", "Reconnects to the OCPP central system.", labels=_CP_LABELS
    )
    queued = GaugeMetricFamily(
        f"{PREFIX}_ocpp_queue_length",
        "OCPP messages waiting for the central system (transaction messages in the state file).",
        labels=_CP_LABELS,
    )
    for point in linked:
        assert point.ocpp is not None
        ident = point.identity
        labels = [str(ident.lp or ""), ident.public_id, ident.name]
        up.add_metric(labels, int(point.ocpp.up))
        reconnects.add_metric(labels, point.ocpp.reconnects)
        queued.add_metric(labels, point.ocpp.queued)
    messages = CounterMetricFamily(
        f"{PREFIX}_ocpp_messages",
        "OCPP calls, by direction (in: from the central system), action and result.",
        labels=["direction", "action", "result"],
    )
    for direction, action, result, count in snap.ocpp_messages:
        messages.add_metric([direction, action, result], count)
    yield from (up, reconnects, queued, messages)


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    """One sample, unless the value is unknown (what a register serves as -1)."""
    if value is not None:
        family.add_metric(labels, value)


class Metrics(LinkObserver, LimiterObserver):
    """The service's metrics registry, and the observer of link, control and Modbus events."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._collector = _SnapshotCollector()
        self._lock = threading.Lock()  # one exposition at a time renders its snapshot
        self.registry.register(self._collector)
        self._modbus_requests = Counter(
            f"{PREFIX}_modbus_requests",
            "Modbus requests answered, by function code and result.",
            ["function_code", "result"],
            registry=self.registry,
        )
        self._modbus_exceptions = Counter(
            f"{PREFIX}_modbus_exceptions",
            "Modbus exception responses, by exception code.",
            ["code"],
            registry=self.registry,
        )
        self._sessions_opened = Counter(
            f"{PREFIX}_station_sessions_opened",
            "Station sessions established.",
            registry=self.registry,
        )
        self._sessions_closed = Counter(
            f"{PREFIX}_station_connections_closed",
            "Station connections closed (established or not).",
            registry=self.registry,
        )
        self._protocol_errors = Counter(
            f"{PREFIX}_protocol_errors",
            "Malformed input from stations, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._command_duration = Histogram(
            f"{PREFIX}_station_command_duration_seconds",
            "Round-trip time of station requests, by command.",
            ["command"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self._log_lines_dropped = Counter(
            f"{PREFIX}_station_log_lines_dropped",
            "Station log lines not logged (rate or size limit).",
            registry=self.registry,
        )
        self._phase_switches = Counter(
            f"{PREFIX}_phase_switches",
            "Phase-switch commands run, by result.",
            ["result"],
            registry=self.registry,
        )
        self._response_counters: dict[tuple[int, int | None], list[Counter]] = {}
        self._connections_refused = Counter(
            f"{PREFIX}_connections_refused",
            "Connections refused at accept, by listener and reason.",
            ["listener", "reason"],
            registry=self.registry,
        )
        self._connections_evicted = Counter(
            f"{PREFIX}_connections_evicted",
            "Connections closed to admit a newcomer, by listener and the kind closed.",
            ["listener", "reason"],
            registry=self.registry,
        )
        self._commands_refused = Counter(
            f"{PREFIX}_commands_refused",
            "Controller commands refused, by interface and reason.",
            ["interface", "reason"],
            registry=self.registry,
        )

    def exposition(self, snapshot: Snapshot) -> bytes:
        """The text exposition of ``snapshot`` and the counters (thread-safe)."""
        with self._lock:
            self._collector.snapshot = snapshot
            try:
                return generate_latest(self.registry)
            finally:
                self._collector.snapshot = None

    # Modbus events (from the server's observer)
    def response(self, function_code: int, exception_code: int | None) -> None:
        """Count one answered Modbus request."""
        counters = self._response_counters.get((function_code, exception_code))
        if counters is None:  # labels() costs more than the rest of a read: once per kind
            result = "ok" if exception_code is None else "exception"
            counters = [self._modbus_requests.labels(str(function_code), result)]
            if exception_code is not None:
                counters.append(self._modbus_exceptions.labels(str(exception_code)))
            self._response_counters[(function_code, exception_code)] = counters
        for counter in counters:
            counter.inc()

    # link events
    def session_opened(self, serial: str) -> None:
        self._sessions_opened.inc()

    def session_closed(self, serial: str | None, reason: str) -> None:
        self._sessions_closed.inc()

    def protocol_error(self, reason: str) -> None:
        self._protocol_errors.labels(reason).inc()

    def command_rtt(self, command: str, seconds: float) -> None:
        self._command_duration.labels(command).observe(seconds)

    def log_lines_dropped(self, count: int) -> None:
        self._log_lines_dropped.inc(count)

    def connection_refused(self, listener: str, reason: str) -> None:
        self._connections_refused.labels(listener, reason).inc()

    def connection_evicted(self, listener: str, reason: str) -> None:
        self._connections_evicted.labels(listener, reason).inc()

    def command_refused(self, interface: str, reason: str) -> None:
        """Count one controller command that was refused."""
        self._commands_refused.labels(interface, reason).inc()

    def phase_switch(self, ok: bool) -> None:
        """Count one run of the phase-switch command."""
        self._phase_switches.labels("ok" if ok else "failed").inc()
