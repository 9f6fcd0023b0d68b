"""Who the HTTP server answers: requests for one of its own names, never embedded elsewhere.

DNS rebinding lets a page on another site talk to a server on the LAN under the site's own name,
so every request's Host header must name this server: an IP address (what a LAN client types),
localhost, this machine's name (with or without a domain), or a name in ``http_hosts``. Every
answer forbids being framed and loading anything from elsewhere (CSP).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The page loads its own script and style only; nobody may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def own_names(extra: Iterable[str] = ()) -> frozenset[str]:
    """The names this server answers to besides IP addresses."""
    names = {"localhost", *extra}
    host = socket.gethostname().lower()
    names |= {host, host.split(".", 1)[0], f"{host.split('.', 1)[0]}.local"}
    fqdn = socket.getfqdn().lower()
    if fqdn and fqdn != "localhost":
        names.add(fqdn)
    return frozenset(name.lower() for name in names)


def host_of(header: str) -> str:
    """The host part of a Host header (without the port; IPv6 without brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed(header: str, names: frozenset[str]) -> bool:
    """Whether a request with this Host header is for this server."""
    host = host_of(header)
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host.rstrip(".") in names


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def middleware(names: frozenset[str]) -> Middleware:
    """An aiohttp middleware: refuse foreign Host headers (421), add the security headers."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allowed(request.headers.get("Host", ""), names):
            response: web.StreamResponse = web.json_response(
                {"error": "this server does not answer to that host name (see http_hosts)"},
                status=421,
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # 404, 405, 413...: the same headers
                exc.headers.update(SECURITY_HEADERS)
                raise
        response.headers.update(SECURITY_HEADERS)
        return response

    return guard
