"""One aiohttp server on the metrics port: /metrics, the status page, its JSON API, actions.

HTTP runs on the event loop. What keeps it from starving the stations and Modbus is bounded:
connections pass a :class:`~.gate.Gate` (caps, lifetime), and the two answers whose size grows
with the stations (/metrics, /api/status) are made in a worker thread at most at a rate that
keeps their cost near a tenth of a core (see :class:`~.throttle.Throttled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..chargepoint import fresh_data
from ..limits import ConnectionLimiter
from .actions import MAX_REQUEST_BODY, AdminApi
from .gate import Gate
from .history import PowerHistory
from .snapshot import status_json
from .throttle import Throttled

if TYPE_CHECKING:
    from ..bridge import Bridge

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


class WebServer:
    """The HTTP server of a bridge."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.history = PowerHistory()
        # One worker thread makes the two bodies that grow with the number of stations.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="http-body")
        registry = bridge.metrics.registry
        self.exposition = Throttled(lambda: generate_latest(registry), self._worker)
        self.status = Throttled(
            lambda: json.dumps(status_json(bridge, self.history)).encode(), self._worker
        )
        self._sampler: asyncio.Task[None] | None = None
        app = web.Application(client_max_size=MAX_REQUEST_BODY)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        AdminApi(bridge).add_routes(app)
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
            "http", MAX_CONNECTIONS, MAX_PER_ADDRESS, observer=self.bridge.metrics
        )
        self.gate = Gate(self._runner.server, limiter, CONNECTION_MAX_AGE)
        try:
            self._server = await asyncio.get_running_loop().create_server(self.gate, host, port)
        except OSError as err:
            await self._runner.cleanup()
            raise OSError(f"cannot serve HTTP on {host}:{port}: {err.strerror or err}") from err
        self.port = self._server.sockets[0].getsockname()[1]
        self._sampler = asyncio.create_task(self._sample_power())
        log.info("HTTP on http://%s:%d/ (status page, /metrics)", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is None:
            return
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        self._server.close()
        await self._runner.cleanup()
        assert self.gate is not None
        self.gate.close_all()
        await self._server.wait_closed()
        self.exposition.close()
        self.status.close()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._server = None

    async def _sample_power(self) -> None:
        while True:
            now = self.bridge.clock()
            powers = []
            for serial, point in self.bridge.charge_points.items():
                data = fresh_data(point.state, now, point.max_data_age)
                powers.append((serial, data.power_w if data else None))  # None: a gap
            self.history.sample(powers, time.time())
            await asyncio.sleep(self.history.interval)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.status.body(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=await self.exposition.body(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
