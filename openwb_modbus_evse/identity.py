"""Who a station is beyond its ID: where the LAN last saw it.

A station's 128-bit ID is all it sends, and anyone who learned it can send it too. So the
service remembers, for every station that keeps its LP, the address it connects from and (on the
same link) its MAC address. A connection with that ID from elsewhere is only a claim: the peer is
polled and kept safe, but it drives nothing and counts no energy until the owner confirms it
(page or CLI). The same MAC at a new address (DHCP) is the station; with no MAC on either side
the address decides. A configured ``address`` pin replaces all of this (the link checks it).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

PEER_RECORD = "peer/"  # state-file records: where each kept station was last seen, by serial
PUBLIC_ID_KEY_RECORD = "key/public_id"  # state-file record: the public ids' random key


@dataclass(frozen=True)
class Peer:
    """Where a connection comes from."""

    address: str
    mac: str | None = None

    def __str__(self) -> str:
        return f"{self.address} (MAC {self.mac})" if self.mac else self.address


def recognised(known: Peer | None, peer: Peer) -> bool:
    """True if ``peer`` is the station last seen as ``known`` (None: nothing known yet)."""
    if known is None:
        return True  # the first time: what the LAN says now is what is remembered
    if known.mac and peer.mac:
        return known.mac == peer.mac
    return known.address == peer.address


def learned(known: Peer | None, peer: Peer) -> Peer:
    """What to remember after the station was recognised at ``peer``: a MAC once learned is kept
    while the station is seen from an address the table has no entry for (the same address)."""
    if known is not None and peer.mac is None and known.address == peer.address:
        return known
    return peer


def to_record(peer: Peer, wall: float) -> dict[str, Any]:
    """The state-file record of ``peer``, seen at Unix time ``wall``."""
    return {"address": peer.address, "mac": peer.mac, "at": round(wall)}


def from_record(value: object) -> Peer | None:
    """A record back; None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("address"), str):
        return None
    mac = value.get("mac")
    return Peer(value["address"], mac if isinstance(mac, str) else None)


def public_id(key: bytes, serial: str) -> str:
    """What names a station where anyone may read it (the serial number register, MQTT topics):
    stable, unique, and not the ID: 12 hex digits of a hash keyed with a random ``key``."""
    return hmac.new(key, serial.encode(), hashlib.sha256).hexdigest()[:12]
