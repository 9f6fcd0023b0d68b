"""The HTTP side against a hostile page and a guesser (issue 19): DNS rebinding is refused by
the Host check, nothing may frame the page, and wrong admin tokens are throttled per address."""

from __future__ import annotations

import aiohttp
import pytest
from ports import free_port

from openwb_modbus_evse.interfaces.http.origin import allowed, host_of, own_names

TOKEN = "0123456789abcdef0123"


@pytest.fixture
async def rig(make_rig, settings):
    return await make_rig(
        settings,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        admin_token=TOKEN,
        http_hosts=("wallbox.example",),
    )


async def get(rig, path: str, host: str, **headers: str) -> tuple[int, dict, bytes]:
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Host": host, **headers}) as response,
    ):
        return response.status, dict(response.headers), await response.read()


@pytest.mark.parametrize("path", ["/", "/api/status", "/metrics"])
async def test_a_rebound_name_gets_nothing(rig, path):
    status, _, body = await get(rig, path, "attacker.example:9502")
    assert status == 421 and b"openwb" not in body.lower()


@pytest.mark.parametrize(
    "host", ["127.0.0.1:9502", "localhost", "[::1]:9502", "wallbox.example", "WALLBOX.example."]
)
async def test_its_own_names_and_any_address_are_served_with_security_headers(rig, host):
    status, headers, _ = await get(rig, "/api/status", host)
    assert status == 200
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"


async def test_wrong_tokens_are_throttled_per_address(rig):
    url = f"http://127.0.0.1:{rig.bridge.metrics_port}/api/stations"
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            headers = {"Authorization": "Bearer wrong-token-guess-0000"}
            async with session.get(url, headers=headers) as response:
                statuses.append(response.status)
        # Throttled: even the right token waits now (the guesser cannot tell).
        async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 429 and response.headers["Retry-After"] == "5"
    assert statuses[:5] == [403] * 5 and set(statuses[5:]) == {429}


def test_host_header_parsing():
    names = own_names(["wallbox.example"])
    assert host_of("[fe80::1]:80") == "fe80::1" and host_of("a.b:8080") == "a.b"
    assert allowed("192.168.1.5:9502", names) and allowed("[fe80::1]", names)
    assert allowed("localhost:9502", names) and not allowed("", names)
    assert not allowed("192.168.1.5.attacker.example", names)
