"""A central system for the tests: the ``ocpp`` library's server side on a websockets server.

It validates every message against the OCPP 1.6 JSON schemas (the library does, both ways),
records every call a charge point makes (action, payload), answers as SteVe and evcc do, and lets
a test send calls to a connected charge point.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import websockets
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call_result
from ocpp.v16.enums import Action


async def eventually(check: Any, timeout: float = 5.0) -> None:
    """Wait until ``check()`` is true (this module is also used by the bench, without pytest)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Received:
    """One call a charge point made."""

    ident: str
    action: str
    payload: dict[str, Any]


class _Cs(ChargePoint):
    def __init__(self, ident: str, ws: Any, csms: Csms) -> None:
        super().__init__(ident, ws, response_timeout=5)
        self.csms = csms

    def _record(self, action: str, **payload: Any) -> None:
        self.csms.received.append(Received(self.id, action, payload))

    @on(Action.boot_notification)
    def boot(self, **kw: Any) -> Any:
        self._record("BootNotification", **kw)
        return call_result.BootNotification(_now(), self.csms.heartbeat_interval, "Accepted")

    @on(Action.heartbeat)
    def heartbeat(self) -> Any:
        self._record("Heartbeat")
        return call_result.Heartbeat(_now())

    @on(Action.status_notification)
    def status(self, **kw: Any) -> Any:
        self._record("StatusNotification", **kw)
        return call_result.StatusNotification()

    @on(Action.start_transaction)
    def start_tx(self, **kw: Any) -> Any:
        self._record("StartTransaction", **kw)
        tx = next(self.csms.tx_ids)
        self.csms.tx_given.append(tx)
        return call_result.StartTransaction(tx, {"status": self.csms.id_tag_status})

    @on(Action.stop_transaction)
    def stop_tx(self, **kw: Any) -> Any:
        self._record("StopTransaction", **kw)
        return call_result.StopTransaction(id_tag_info={"status": "Accepted"})

    @on(Action.meter_values)
    def meter(self, **kw: Any) -> Any:
        self._record("MeterValues", **kw)
        return call_result.MeterValues()

    @on(Action.firmware_status_notification)
    def firmware(self, **kw: Any) -> Any:
        self._record("FirmwareStatusNotification", **kw)
        return call_result.FirmwareStatusNotification()


@dataclass
class Csms:
    """The central system; ``port`` is fixed so it can be killed and brought back."""

    port: int = 0
    heartbeat_interval: int = 300
    id_tag_status: str = "Accepted"
    passwords: dict[str, str] | None = None  # Security Profile 1: ident -> password
    received: list[Received] = field(default_factory=list)
    connected: dict[str, _Cs] = field(default_factory=dict)
    connections: int = 0
    tx_given: list[int] = field(default_factory=list)  # transaction ids, in order
    connect_times: list[float] = field(default_factory=list)  # time.monotonic() of each
    tx_ids: itertools.count = field(default_factory=lambda: itertools.count(1001))
    _server: Any = None

    async def start(self, ssl: Any = None) -> None:
        """Listen on loopback."""
        self._server = await websockets.serve(
            self._handler,
            "127.0.0.1",
            self.port,
            subprotocols=[websockets.Subprotocol("ocpp1.6")],
            process_request=self._check_auth if self.passwords is not None else None,
            ssl=ssl,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, scheme: str = "ws") -> str:
        """The ocpp_url of this central system."""
        return f"{scheme}://127.0.0.1:{self.port}/ocpp"

    def _check_auth(self, connection: Any, request: Any) -> Any:
        ident = request.path.rsplit("/", 1)[-1]
        header = request.headers.get("Authorization", "")
        expected = base64.b64encode(f"{ident}:{self.passwords[ident]}".encode()).decode()
        if ident not in self.passwords or header != f"Basic {expected}":
            return connection.respond(401, "Unauthorized\n")
        return None

    async def _handler(self, ws: Any) -> None:
        ident = ws.request.path.rsplit("/", 1)[-1]
        cs = _Cs(ident, ws, self)
        self.connected[ident] = cs
        self.connections += 1
        self.connect_times.append(time.monotonic())
        try:
            await cs.start()
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.connected.get(ident) is cs:
                del self.connected[ident]

    async def stop(self) -> None:
        """Close the server and every connection (a central system going away)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def of(self, action: str, ident: str | None = None) -> list[dict[str, Any]]:
        """The payloads of ``action`` received (from ``ident``), in order."""
        return [
            r.payload
            for r in self.received
            if r.action == action and (ident is None or r.ident == ident)
        ]

    async def wait(
        self, action: str, count: int = 1, ident: str | None = None, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` calls of ``action`` arrived."""
        await eventually(lambda: len(self.of(action, ident)) >= count, timeout=timeout)
        return self.of(action, ident)

    async def charge_point(self, ident: str, timeout: float = 10.0) -> _Cs:
        """The connected charge point ``ident`` (after its BootNotification)."""
        await eventually(
            lambda: ident in self.connected and self.of("BootNotification", ident),
            timeout=timeout,
        )
        return self.connected[ident]
