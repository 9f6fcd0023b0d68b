"""The client side of the admin API, for the CLI commands that act on a running service."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class AdminError(Exception):
    """The service refused the action, or cannot be reached; the message says why."""


def call(
    base_url: str,
    token: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Send one request to the service's admin API and return its JSON answer."""
    url = base_url.rstrip("/") + path
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = err.reason
        if err.code == 401:
            message += " (pass it with --token TOKEN or OPENWB_MODBUS_EVSE_TOKEN=TOKEN)"
        elif err.code == 403 and "wrong" in str(message):
            message += " (the admin_token in the service's config)"
        raise AdminError(f"{err.code}: {message}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise AdminError(f"cannot reach {base_url}: {reason}") from None


def format_stations(stations: list[dict[str, Any]]) -> str:
    """The station list as a table."""
    rows = [("LP", "name", "serial", "connected", "charging", "kept by", "seen at")]
    for s in stations:
        kept = "config" if s["configured"] else "state file" if s["remembered"] else "-"
        rows.append(
            (
                str(s["lp"] or "-"),
                str(s["name"]),
                str(s["serial"]),
                "yes" if s["connected"] else "no",
                "yes" if s["charging"] else "no",
                kept,
                _seen(s),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _seen(station: dict[str, Any]) -> str:
    """Where the station was last seen, and a peer that claims its ID from elsewhere."""
    seen = station.get("seen_at") or "-"
    claim = station.get("claim")
    return f"{seen}; CLAIMED from {claim} (confirm SERIAL if that is it)" if claim else seen
