"""What the LAN tells about a peer: its MAC address, from the kernel's neighbour table.

A station on the same link as the service has an entry in the ARP table as soon as it has
talked to us (the kernel resolved it to answer). A station behind a router, or on IPv6, has none
here: then only its address is known.
"""

from __future__ import annotations

import re
from pathlib import Path

ARP_TABLE = Path("/proc/net/arp")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_COMPLETE = 0x2  # ATF_COM: the entry is resolved


def mac_of(host: str, table: Path = ARP_TABLE) -> str | None:
    """The MAC address the neighbour table holds for ``host`` (an IPv4 address), or None."""
    try:
        lines = table.read_text(encoding="ascii", errors="replace").splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[0] != host:
            continue
        try:
            flags = int(fields[2], 16)
        except ValueError:
            continue
        mac = fields[3].lower()
        if flags & _COMPLETE and _MAC.match(mac) and mac != "00:00:00:00:00:00":
            return mac
    return None
