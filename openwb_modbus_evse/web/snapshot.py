"""What the status page shows, as JSON: every charge point as the bridge sees it right now.

The measurements are those of the Modbus registers (same function, same freshness rule), so
the page and ``status --json`` agree. Full station IDs are not shown (anyone on the LAN may read
this); the register's serial number is, as on Modbus.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import chargepoint as cp
from ..modbus.registers import chargepoint_values
from .history import PowerHistory

if TYPE_CHECKING:
    from ..bridge import Bridge


def _phases(values: dict[str, Any], prefix: str) -> list[float | None]:
    return [values[f"{prefix}_l{i}"] for i in (1, 2, 3)]


def charge_point_json(
    bridge: Bridge, point: cp.ChargePoint, history: PowerHistory, now: float
) -> dict[str, Any]:
    """One card of the page."""
    state = point.state
    values = chargepoint_values(point, state, int(point.energy.wh), now)
    data = cp.fresh_data(state, now, point.max_data_age)
    session = bridge.link.sessions.get(point.identity.serial)
    heartbeat = bridge.heartbeat_of(point)  # its controller's
    power = values["power"]
    return {
        "lp": point.identity.lp,
        "name": point.name,
        "serial_number": point.identity.serial_number,
        "connected": state.connected,
        "fresh": data is not None,
        "plugged": bool(values.get("plugged")),
        "charging": bool(values.get("charging")),
        "offered_a": values.get("offered_current") or 0.0,
        "requested_a": state.requested_ca / 100,
        "allowed_a": cp.allowed_ca(state) / 100,
        "supply_granted_a": None if state.supply_cap_ca is None else state.supply_cap_ca / 100,
        "power_w": None if power is None else round(power),  # whole watts, as the register
        "energy_wh": values["energy_imported"],
        "voltages_v": _phases(values, "voltage"),
        "currents_a": _phases(values, "current"),
        "pilot": data.pilot.state if data else None,
        "contactor": data.contactor if data else None,
        "controller": state.config.controller,
        "heartbeat_age_s": round(heartbeat.age(), 1) if heartbeat else None,
        "heartbeat_enforced": state.enforce_heartbeat,
        "heartbeat_lapsed": state.heartbeat_lapsed,
        "uptime_s": (data.uptime_ms % 2**32) // 1000 if data else None,
        "rssi_dbm": data.rssi_dbm if data else None,
        "firmware": session.firmware if session else None,
        "data_age_s": round(now - state.data_at, 1) if state.data_at is not None else None,
        "log": list(point.recent_log),
        "history": history.series(point.identity.serial),
    }


def status_json(bridge: Bridge, history: PowerHistory) -> dict[str, Any]:
    """The whole page: charge points in LP order (unserved stations last)."""
    now = bridge.clock()
    points = sorted(
        bridge.charge_points.values(), key=lambda p: (p.identity.lp is None, p.identity.lp or 0)
    )
    return {
        "time": time.time(),
        "history_interval_s": history.interval,
        "charge_points": [charge_point_json(bridge, p, history, now) for p in points],
    }
