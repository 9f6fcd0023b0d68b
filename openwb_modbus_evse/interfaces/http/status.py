"""What the status page shows, as JSON: every charge point as the view shows it.

The measurements are the view's (view.py), as on Modbus and MQTT, so the page, ``status --json``
and every controller agree. Full station IDs are not shown (anyone on the LAN may read this); the
register's serial number is, as on Modbus.
"""

from __future__ import annotations

from typing import Any

from ... import chargepoint as cp
from ...snapshot import PointSnapshot, Snapshot
from ...view import reasons, show


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
        "session_wh": None if point.session_wh is None else int(point.session_wh),
        "voltages_v": list(shown.voltages_v),
        "phases_in_use": shown.phases_in_use,
        "currents_a": list(shown.currents_a),
        "pilot": data.pilot.state if data else None,
        "contactor": data.contactor if data else None,
        "controller": state.config.controller,
        "heartbeat_age_s": (
            round(point.heartbeat_age_s, 1) if point.heartbeat_age_s is not None else None
        ),
        "heartbeat_source": point.heartbeat.source if point.heartbeat else "",
        "heartbeat_enforced": state.enforce_heartbeat,
        "heartbeat_lapsed": state.heartbeat_lapsed,
        "fault": shown.fault,
        "fault_text": shown.fault_text,
        "uptime_s": (data.uptime_ms % 2**32) // 1000 if data else None,
        "rssi_dbm": data.rssi_dbm if data else None,
        "firmware": point.firmware,
        "data_age_s": round(now - state.data_at, 1) if state.data_at is not None else None,
        "log": list(point.recent_log),
        # Why it does not charge (blocking) or charges less than asked, in words.
        "reasons": [
            {"code": r.code, "text": r.text, "blocking": r.blocking}
            for r in reasons(point, now, point.heartbeat, point.last_disconnect, point.claim)
        ],
        "ocpp": _ocpp_json(point),
        "claim": point.claim,
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
    points = [charge_point_json(p, snapshot.now) for p in snapshot.points]
    return {
        "time": snapshot.wall,
        "total_power_w": sum(p["power_w"] for p in points),
        "supply_limit_a": snapshot.supply_limit_a,
        "charge_points": points,
    }


def history_json(snapshot: Snapshot) -> dict[str, Any]:
    """The power charts: average W per minute (null: no data) from ``start`` (unix time), per
    charge point. Apart from /api/status: it changes once a minute and is 50 times larger."""
    return {
        "time": snapshot.wall,
        "step_s": snapshot.history_interval_s,
        "charge_points": [
            {
                "lp": p.identity.lp,
                "serial_number": p.identity.serial_number,
                "start": p.history[0],
                "w": list(p.history[1]),
            }
            for p in snapshot.points
        ],
    }
