"""Prometheus metrics: live charge-point values read at scrape time, and service counters.

The collector keeps no copy of the state: every scrape reads the bridge's charge points. Events
that are not state (Modbus requests, protocol errors, command round trips) are counted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .chargepoint import allowed_ca, fresh_data, short_serial
from .evse.link import LinkObserver
from .limits import LimiterObserver
from .modbus.registers import Value, chargepoint_values

if TYPE_CHECKING:
    from .bridge import Bridge

disable_created_metrics()  # *_created series only double the counters here

PREFIX = "openwb_modbus_evse"
_CP_LABELS = ["lp", "serial", "name"]
_PILOT_STATES = ("A", "B", "C", "D", "E", "F", "unknown")


class _ChargePointCollector(Collector):
    """Reads every charge point of the bridge when scraped."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterator[Metric]:
        bridge = self._bridge
        now = bridge.clock()

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

        for point in list(bridge.charge_points.values()):
            ident = point.identity
            labels = [str(ident.lp or ""), short_serial(ident.serial), ident.name]
            state = point.state
            energy.add_metric(labels, point.energy.wh * 3600)
            requested.add_metric(labels, state.requested_ca / 100)
            allowed.add_metric(labels, allowed_ca(state) / 100)
            connected.add_metric(labels, 1 if state.connected else 0)
            if state.supply_cap_ca is not None:
                granted.add_metric(labels, state.supply_cap_ca / 100)
            implausible.add_metric(labels, point.implausible_reports)
            controller.add_metric([*labels, state.config.controller], 1)
            if state.data_at is not None:
                age.add_metric(labels, now - state.data_at)
            # What the registers serve, so a sum here is what evcc and Home Assistant sum;
            # a value the registers serve as unknown (-1, None here) is left out.
            served = chargepoint_values(point, state, int(point.energy.wh), now)
            for i in (1, 2, 3):
                phase = [*labels, str(i)]
                _add(voltage, phase, served[f"voltage_l{i}"])
                _add(current, phase, served[f"current_l{i}"])
                _add(phase_power, phase, served[f"power_l{i}"])
            _add(power, labels, served["power"])
            _add(plugged, labels, served["plugged"])
            _add(charging_, labels, served["charging"])
            _add(offered, labels, served["offered_current"])
            data = fresh_data(state, now, point.max_data_age)
            if data is None:
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
        yield from (uptime, age, connected, implausible, controller)

        heartbeat = bridge.heartbeat
        yield GaugeMetricFamily(
            f"{PREFIX}_heartbeat_age_seconds",
            "Seconds since the last Modbus request.",
            value=heartbeat.age(),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_heartbeat_lapsed", "1 while the heartbeat is lapsed.", value=heartbeat.lapsed
        )
        yield CounterMetricFamily(
            f"{PREFIX}_heartbeat_lapses", "Heartbeat lapses.", value=heartbeat.lapses
        )
        yield CounterMetricFamily(
            f"{PREFIX}_heartbeat_recoveries", "Heartbeat recoveries.", value=heartbeat.recoveries
        )
        mqtt = bridge.mqtt
        if mqtt is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_mqtt_connected",
                "1 while connected to the MQTT broker.",
                int(mqtt.connected),
            )
            for name, doc, value in (
                ("mqtt_messages_received", "MQTT messages received.", mqtt.messages_in),
                ("mqtt_messages_sent", "MQTT messages sent.", mqtt.messages_out),
                ("mqtt_messages_dropped", "MQTT messages dropped.", mqtt.messages_dropped),
            ):
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        if bridge.openwb is not None:
            age_ = GaugeMetricFamily(
                f"{PREFIX}_mqtt_heartbeat_age_seconds",
                "Seconds since the openWB primary's last fresh heartbeat (or since start).",
                labels=["prefix"],
            )
            lapsed_ = GaugeMetricFamily(
                f"{PREFIX}_mqtt_heartbeat_lapsed",
                "1 while the openWB primary's heartbeat is lapsed (or has not come yet).",
                labels=["prefix"],
            )
            for prefix, primary in bridge.openwb.heartbeats.items():
                age_.add_metric([prefix], primary.clock.age())
                lapsed_.add_metric([prefix], int(primary.clock.lapsed))
            yield from (age_, lapsed_)
        if bridge.rust_bridge is not None:
            beat = bridge.rust_bridge.heartbeat
            yield GaugeMetricFamily(
                f"{PREFIX}_bridge_heartbeat_age_seconds",
                "Seconds since the last Rust-bridge MQTT request (or since start).",
                value=beat.age(),
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_bridge_heartbeat_lapsed",
                "1 while no Rust-bridge MQTT request came for bridge_heartbeat_timeout.",
                value=int(beat.lapsed),
            )
        yield GaugeMetricFamily(
            f"{PREFIX}_station_sessions",
            "Stations with an established session.",
            value=len(bridge.link.sessions),
        )
        connections = GaugeMetricFamily(
            f"{PREFIX}_connections", "Connections open now, by listener.", labels=["listener"]
        )
        for limiter in bridge.limiters():
            connections.add_metric([limiter.listener], limiter.open)
        yield connections


def _add(family: GaugeMetricFamily, labels: list[str], value: Value) -> None:
    """One sample, unless the value is unknown (what a register serves as -1)."""
    if isinstance(value, int | float):
        family.add_metric(labels, value)


class Metrics(LinkObserver, LimiterObserver):
    """The bridge's metrics registry, and the observer of link and Modbus events."""

    def __init__(self, bridge: Bridge) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ChargePointCollector(bridge))
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
        self._commands_refused = Counter(
            f"{PREFIX}_commands_refused",
            "Controller commands refused, by interface and reason.",
            ["interface", "reason"],
            registry=self.registry,
        )

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

    def command_refused(self, interface: str, reason: str) -> None:
        """Count one controller command that was refused."""
        self._commands_refused.labels(interface, reason).inc()

    def phase_switch(self, ok: bool) -> None:
        """Count one run of the phase-switch command."""
        self._phase_switches.labels("ok" if ok else "failed").inc()
