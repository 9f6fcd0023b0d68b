"""What the status page shows, as JSON: every charge point as the view shows it.

The measurements are the view's (view.py), as on Modbus and MQTT, so the page, ``status --json``
and every controller agree. Full station IDs are not shown (anyone on the LAN may read this); the
register's serial number is, as on Modbus.
"""

from __future__ import annotations

from typing import Any

from ... import chargepoint as cp
from ...snapshot import PointSnapshot, Snapshot
from ...view import show


def charge_point_json(point: PointSnapshot, now: float) -> dict[str, Any]:
    """One card of the page."""
    state = point.state
    shown = show(point, now)
    data = shown.data
    return {
        "lp": point.identity.lp,
        "name": point.identity.name,
        "serial_number": point.identity.serial_number,
        "connected": state.connected,
        "fresh": data is not None,
        "plugged": shown.plugged,
        "charging": shown.charging,
        "offered_a": shown.offered_a,
        "requested_a": state.requested_ca / 100,
        "allowed_a": cp.allowed_ca(state) / 100,
        "supply_granted_a": None if state.supply_cap_ca is None else state.supply_cap_ca / 100,
        "power_w": round(shown.power_w),  # whole watts, as the register
        "energy_wh": int(shown.energy_wh),
        "voltages_v": list(shown.voltages_v),
        "currents_a": list(shown.currents_a),
        "pilot": data.pilot.state if data else None,
        "contactor": data.contactor if data else None,
        "controller": state.config.controller,
        "heartbeat_age_s": (
            round(point.heartbeat_age_s, 1) if point.heartbeat_age_s is not None else None
        ),
        "heartbeat_enforced": state.enforce_heartbeat,
        "heartbeat_lapsed": state.heartbeat_lapsed,
        "fault": shown.fault,
        "fault_text": shown.fault_text,
        "uptime_s": (data.uptime_ms % 2**32) // 1000 if data else None,
        "rssi_dbm": data.rssi_dbm if data else None,
        "firmware": point.firmware,
        "data_age_s": round(now - state.data_at, 1) if state.data_at is not None else None,
        "log": list(point.recent_log),
        "history": [list(sample) for sample in point.history],
        "ocpp": _ocpp_json(point),
    }


def _ocpp_json(point: PointSnapshot) -> dict[str, Any] | None:
    """The station's OCPP connection (None: it has none)."""
    link = point.ocpp
    if link is None:
        return None
    return {
        "id": link.ident,
        "url": link.url,
        "connected": link.up,
        "reconnects": link.reconnects,
        "queued": link.queued,
        "status": link.status,
        "transaction": link.transaction,
    }


def status_json(snapshot: Snapshot) -> dict[str, Any]:
    """The whole page: charge points in LP order (unserved stations last)."""
    return {
        "time": snapshot.wall,
        "history_interval_s": snapshot.history_interval_s,
        "charge_points": [charge_point_json(p, snapshot.now) for p in snapshot.points],
    }
