"""The admin API: actions on stations, each allowed only with the configured bearer token.

Without ``admin_token`` every action answers 403; a request without the token gets 401, one with
a wrong token 403. Every action (done, refused or failed) is logged with the client address;
failed token checks are logged rate-limited, so guessing cannot flood the log.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ... import chargepoint as cp
from ...actions import ActionError, ActionErrorKind
from ...config import CONTROLLERS, MAX_LP
from ...control import Command, Kind
from ...dimming import HTTP, BadLimit, Dimming, limit_from_json
from ...evse.protocol import MAX_FIRMWARE_SIZE
from ...firmware import FirmwareUpdater
from ...limits import address_key
from ...ratelimit import RateLimit
from ...registry import Registry
from ...store import StoreError

log = logging.getLogger(__name__)

_STATUS = {
    ActionErrorKind.BAD_REQUEST: 400,
    ActionErrorKind.NOT_FOUND: 404,
    ActionErrorKind.CONFLICT: 409,
    ActionErrorKind.TOO_LARGE: 413,
    ActionErrorKind.FAILED: 502,
}

# Wrong admin tokens from one address (an IPv6 /64): this many, then one every 5 s; the
# addresses remembered at most (the oldest forgotten first).
TOKEN_TRIES, TOKEN_TRIES_PER_SECOND, GUESSERS_KEPT = 5, 1 / 5, 1024
FIRMWARE_TIMEOUT = 120.0  # seconds a station may take to flash, restart and reconnect
FIRMWARE_TIMEOUT_MAX = 240.0  # stays below the HTTP connection's lifetime (server.py)
# The request body may hold a whole image; aiohttp refuses anything larger before we read it.
MAX_REQUEST_BODY = MAX_FIRMWARE_SIZE + 1

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class AdminApi:
    """Routes under /api that change something (and the station list, which shows full IDs)."""

    def __init__(
        self,
        registry: Registry,
        firmware: FirmwareUpdater,
        admin_token: str,
        dimming: Dimming | None = None,
    ) -> None:
        self._registry = registry
        self._dimming = dimming
        self._updater = firmware
        self._token = admin_token.encode()
        self._failed_log = RateLimit(per_second=1 / 10, burst=5, kind="admin_token")
        self._guesses: dict[str, RateLimit] = {}  # addresses that sent a wrong token

    def add_routes(self, app: web.Application) -> None:
        """Register the routes on ``app``."""
        app.router.add_get("/api/stations", self._guard("list stations", self._stations))
        app.router.add_post("/api/stations/{serial}/move", self._guard("move", self._move))
        app.router.add_post("/api/stations/{serial}/forget", self._guard("forget", self._forget))
        app.router.add_post(
            "/api/stations/{serial}/confirm", self._guard("confirm peer", self._confirm)
        )
        app.router.add_post(
            "/api/stations/{serial}/firmware", self._guard("firmware update", self._firmware)
        )
        app.router.add_post("/api/supply/limit", self._guard("supply limit", self._supply_limit))
        # The owner's controls: through the control path as controller "manual".
        app.router.add_post("/api/stations/{serial}/current", self._guard("current", self._current))
        app.router.add_post("/api/stations/{serial}/stop", self._guard("stop", self._stop))
        app.router.add_post(
            "/api/stations/{serial}/cp-interruption",
            self._guard("pilot interruption", self._cp_interruption),
        )
        app.router.add_post(
            "/api/stations/{serial}/controller", self._guard("controller", self._controller)
        )

    def _guard(self, action: str, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.Response:
            client = request.remote or "?"
            refusal = self._check_token(request, action, client)
            if refusal is not None:
                return refusal
            what = f"{action} {request.match_info.get('serial', '')}".strip()
            try:
                response = await handler(request)
            except ActionError as err:
                log.warning("action %s by %s: %s", what, client, err)
                return _error(_STATUS[err.kind], str(err))
            except cp.Refused as refusal:  # logged and counted by the control path
                status = 400 if refusal.kind is cp.RefusalKind.BAD_VALUE else 409
                text = str(refusal)
                if refusal.kind is cp.RefusalKind.NOT_CONTROLLER:
                    text += ": switch its controller to manual first"
                return _error(status, text)
            except StoreError as err:
                log.error("action %s by %s: %s", what, client, err)
                return _error(502, str(err))
            log.info("action %s by %s: done", what, client)
            return response

        return guarded

    def _check_token(self, request: web.Request, action: str, client: str) -> web.Response | None:
        if not self._token:
            return _error(403, "actions are off: set admin_token in the config to use them")
        guesses = self._guesses.get(address_key(client))
        if guesses is not None and not guesses.available(time.monotonic()):
            # Guessing is throttled per address: a few tries, then one every few seconds.
            wait = round(1 / TOKEN_TRIES_PER_SECOND)
            return _error(
                429, "too many wrong tokens from this address", **{"Retry-After": str(wait)}
            )
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            self._log_failure(action, client, "no token")
            return _error(
                401, "this action needs the admin token", **{"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.strip().encode(), self._token):
            self._log_failure(action, client, "wrong token")
            self._wrong_token(client)
            return _error(403, "wrong admin token")
        return None

    def _wrong_token(self, client: str) -> None:
        key = address_key(client)
        bucket = self._guesses.pop(key, None) or RateLimit(TOKEN_TRIES_PER_SECOND, TOKEN_TRIES)
        bucket.allow(time.monotonic())  # each wrong one uses a try; a right one none
        self._guesses[key] = bucket  # the most recent last: the oldest go first when full
        while len(self._guesses) > GUESSERS_KEPT:
            self._guesses.pop(next(iter(self._guesses)))

    def _log_failure(self, action: str, client: str, why: str) -> None:
        if self._failed_log.allow(time.monotonic()):
            more = self._failed_log.left_out()
            log.warning("action %s by %s refused: %s%s", action, client, why, more)

    # --- LP assignment ----------------------------------------------------------------------

    async def _stations(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "stations": self._registry.stations(),
                "controllers": self._registry.usable_controllers(),
            }
        )

    async def _move(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        lp = body.get("lp")
        if isinstance(lp, bool) or not isinstance(lp, int):
            raise ActionError(
                ActionErrorKind.BAD_REQUEST, f'send {{"lp": N}} with N in 1..{MAX_LP}'
            )
        self._registry.move(request.match_info["serial"].upper(), lp)
        return web.json_response({"ok": True, "lp": lp})

    async def _firmware(self, request: web.Request) -> web.Response:
        try:
            timeout = float(request.query.get("timeout", FIRMWARE_TIMEOUT))
        except ValueError:
            timeout = -1.0
        if not 1 <= timeout <= FIRMWARE_TIMEOUT_MAX:
            raise ActionError(
                ActionErrorKind.BAD_REQUEST, f"timeout must be 1..{FIRMWARE_TIMEOUT_MAX:g} s"
            )
        image = await _image(request)
        serial = request.match_info["serial"].upper()
        result = await self._updater.update(serial, image, timeout)
        log.info(
            "station %s: firmware %s -> %s",
            serial,
            result["firmware_before"],
            result["firmware_after"],
        )
        return web.json_response({"ok": True, **result})

    # --- grid operator dimming --------------------------------------------------------------

    async def _supply_limit(self, request: web.Request) -> web.Response:
        if self._dimming is None:
            raise ActionError(ActionErrorKind.CONFLICT, "dimming is off")
        try:
            ca = limit_from_json(await _json_body(request))
        except BadLimit as err:
            raise ActionError(ActionErrorKind.BAD_REQUEST, str(err)) from None
        try:
            self._dimming.set(HTTP, ca)
        except StoreError as err:
            raise ActionError(
                ActionErrorKind.FAILED, f"the limit applies but cannot be kept: {err}"
            ) from None
        limit = self._dimming.limit_ca
        return web.json_response(
            {
                "ok": True,
                "http_limit_a": None if ca is None else ca / 100,
                "dimming_limit_a": None if limit is None else limit / 100,
            }
        )

    # --- the owner's controls (controller "manual") -------------------------------------------

    async def _current(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        amps = body.get("amps")
        if isinstance(amps, bool) or not isinstance(amps, int | float) or not 0 <= amps <= 32:
            raise ActionError(
                ActionErrorKind.BAD_REQUEST, 'send {"amps": A} with A 0 (stop) or 6..32'
            )
        centiamps = round(amps * 100)
        self._registry.manual(
            request.match_info["serial"].upper(), Command(Kind.CURRENT, centiamps)
        )
        return web.json_response({"ok": True, "amps": centiamps / 100})

    async def _stop(self, request: web.Request) -> web.Response:
        self._registry.manual(request.match_info["serial"].upper(), Command(Kind.CURRENT, 0))
        return web.json_response({"ok": True, "amps": 0})

    async def _cp_interruption(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        seconds = body.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ActionError(
                ActionErrorKind.BAD_REQUEST,
                f'send {{"seconds": N}} with N in 1..{cp.CP_INTERRUPTION_MAX_S}',
            )
        command = Command(Kind.CP_INTERRUPTION, seconds)
        self._registry.manual(request.match_info["serial"].upper(), command)
        return web.json_response({"ok": True, "seconds": seconds})

    async def _controller(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        controller = body.get("controller")
        if not isinstance(controller, str):
            raise ActionError(
                ActionErrorKind.BAD_REQUEST,
                f'send {{"controller": C}} with C one of {", ".join(CONTROLLERS)}',
            )
        self._registry.set_controller(request.match_info["serial"].upper(), controller)
        return web.json_response({"ok": True, "controller": controller})

    async def _confirm(self, request: web.Request) -> web.Response:
        peer = self._registry.confirm_peer(request.match_info["serial"].upper())
        return web.json_response({"ok": True, "peer": str(peer)})

    async def _forget(self, request: web.Request) -> web.Response:
        self._registry.forget(request.match_info["serial"].upper())
        return web.json_response({"ok": True})


async def _image(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ActionError(
            ActionErrorKind.TOO_LARGE,
            f"the image is larger than a station holds ({MAX_FIRMWARE_SIZE} bytes)",
        ) from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ActionError(ActionErrorKind.BAD_REQUEST, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ActionError(ActionErrorKind.BAD_REQUEST, "the body must be a JSON object")
    return body
