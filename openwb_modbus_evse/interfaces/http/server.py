"""One aiohttp server on the metrics port: /metrics, the status page, its JSON API, actions.

HTTP runs on the event loop. What keeps it from starving the stations and Modbus is bounded:
connections pass a :class:`~.gate.Gate` (caps, lifetime), and the two answers whose size grows
with the stations (/metrics, /api/status) are encoded in a worker thread, from a frozen snapshot
taken on the event loop, at most at a rate that keeps their cost near a tenth of a core (see
:class:`~.throttle.Throttled`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ...limits import ConnectionLimiter
from ...snapshot import Snapshot, SupplySnapshot
from ..metrics import Metrics
from .actions import MAX_REQUEST_BODY, AdminApi
from .gate import Gate, busy_while
from .origin import middleware, own_names
from .status import history_json, status_json
from .throttle import Throttled

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # in total; Prometheus, a few browsers and the CLI need a handful
MAX_PER_ADDRESS = 32  # one client address cannot take every slot
# Seconds; also ends a connection that never completes a request. Above the longest action (a
# firmware update waits up to 240 s for the station to come back).
CONNECTION_MAX_AGE = 300.0
KEEPALIVE = 5.0  # seconds an idle keep-alive connection stays open


# The status page: (file in static/, route, content type). No build step, nothing from a CDN.
_PAGE_FILES = (
    ("index.html", "/", "text/html"),
    ("app.js", "/app.js", "text/javascript"),
    ("style.css", "/style.css", "text/css"),
)


def _file_handler(body: bytes, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=kind, charset="utf-8")

    return handler


def _status(snapshot: Snapshot) -> dict[str, Any]:
    """/api/status: the page's JSON, and the shared supply's limits."""
    return {**status_json(snapshot), "supply": supply_json(snapshot.supply)}


def supply_json(supply: SupplySnapshot | None) -> dict[str, Any] | None:
    """The shared supply's limits (A per phase; None: not set); None without a shared supply."""
    if supply is None:
        return None
    return {
        "limit_a": supply.in_use_a,
        "max_current_a": supply.max_current_a,
        "dimming_a": supply.dimming_a,
        "dimmed": supply.dimming_a is not None,
        "floor_a": supply.floor_a,
        "sources": dict(supply.sources),
    }


class WebServer:
    """The service's HTTP server."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        metrics: Metrics,
        admin: AdminApi,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self._metrics_observer = metrics
        # One worker thread encodes the two bodies that grow with the number of stations.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="http-body")
        self.exposition = Throttled(snapshot, metrics.exposition, self._worker)
        self.status = Throttled(
            snapshot, lambda snap: json.dumps(_status(snap)).encode(), self._worker
        )
        self.history = Throttled(
            snapshot, lambda snap: json.dumps(history_json(snap)).encode(), self._worker
        )
        guard = middleware(own_names() if hosts is None else hosts)
        app = web.Application(
            client_max_size=MAX_REQUEST_BODY, middlewares=[busy_while(lambda: self.gate), guard]
        )
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/history", self._history)
        admin.add_routes(app)
        static = resources.files(__package__) / "static"
        for name, route, kind in _PAGE_FILES:
            body = (static / name).read_bytes()
            app.router.add_get(route, _file_handler(body, kind))
        # No access log: a scraper every few seconds would fill it; actions log themselves.
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=KEEPALIVE
        )
        self._server: asyncio.Server | None = None
        self.gate: Gate | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the port."""
        await self._runner.setup()
        assert self._runner.server is not None
        limiter = ConnectionLimiter(
            "http", MAX_CONNECTIONS, MAX_PER_ADDRESS, observer=self._metrics_observer
        )
        self.gate = Gate(self._runner.server, limiter, CONNECTION_MAX_AGE)
        try:
            self._server = await asyncio.get_running_loop().create_server(self.gate, host, port)
        except OSError as err:
            await self._runner.cleanup()
            raise OSError(f"cannot serve HTTP on {host}:{port}: {err.strerror or err}") from err
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("HTTP on http://%s:%d/ (status page, /metrics)", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is None:
            return
        self._server.close()
        await self._runner.cleanup()
        assert self.gate is not None
        self.gate.close_all()
        await self._server.wait_closed()
        self.exposition.close()
        self.status.close()
        self.history.close()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._server = None

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.status.body(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _history(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.history.body(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.exposition.body(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
