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
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .evse.link import Session
from .store import Store, StoreError

log = logging.getLogger(__name__)

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


def load_public_key(store: Store) -> bytes:
    """The key of the public ids, from the state file (made and kept there the first time)."""
    key = store.records(PUBLIC_ID_KEY_RECORD).get(PUBLIC_ID_KEY_RECORD)
    if isinstance(key, str) and len(key) == 32:
        return bytes.fromhex(key)
    new = secrets.token_bytes(16)
    store.save_records({PUBLIC_ID_KEY_RECORD: new.hex()})
    return new


def peer_of(session: Session) -> Peer:
    """Where a session's connection comes from."""
    return Peer(session.host, session.mac)


class Identities:
    """Where each kept station was last seen (state-file records), and the sessions that claim
    a station's ID from elsewhere (in memory: a claim ends with its connection)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._store: Store | None = None
        self._seen: dict[str, Peer] = {}  # by serial
        self._claimants: dict[str, Session] = {}  # by serial

    def load(self, store: Store) -> None:
        """Read the records; they are written to ``store`` from now on."""
        self._store = store
        for key, value in store.records(PEER_RECORD).items():
            peer = from_record(value)
            if peer is not None:
                self._seen[key.removeprefix(PEER_RECORD)] = peer

    def seen_at(self, serial: str) -> Peer | None:
        """Where the station was last seen (None: nowhere yet)."""
        return self._seen.get(serial)

    def recognises(self, serial: str, peer: Peer) -> bool:
        """Whether ``peer`` is the station as it was last seen."""
        return recognised(self._seen.get(serial), peer)

    def seen(self, serial: str, peer: Peer) -> None:
        """The station (recognised, or confirmed) is at ``peer``: remember it, if that changed."""
        known = self._seen.get(serial)
        new = learned(known, peer)
        if new == known:
            return
        self._seen[serial] = new
        if self._store is not None:
            try:
                self._store.save_records({PEER_RECORD + serial: to_record(new, self._wall())})
            except StoreError as err:  # recognised all the same until a restart
                log.error("%s", err)
        if known is not None:
            log.info("station %s is now seen at %s (was %s)", serial, new, known)

    def forget(self, serial: str) -> dict[str, None]:
        """Forget where the station was seen; returns the record deletion for the state file."""
        self._seen.pop(serial, None)
        return {PEER_RECORD + serial: None}

    def hold(self, session: Session) -> None:
        """``session`` claims its station's ID from elsewhere."""
        assert session.serial is not None
        self._claimants[session.serial] = session

    def claimant(self, serial: str) -> Session | None:
        """The open session that claims the station's ID (None: none)."""
        session = self._claimants.get(serial)
        if session is not None and session.closed:
            del self._claimants[serial]
            return None
        return session

    def release(self, serial: str) -> Session | None:
        """The claim ends (the station took its place, or the owner confirmed it)."""
        return self._claimants.pop(serial, None)
