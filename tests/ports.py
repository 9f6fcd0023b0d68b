"""Loopback ports for servers that must be told their port before they start.

Asking the kernel for port 0, closing the socket and handing the number on is racy: the kernel
gives the same number to the next outgoing connection of any process (it comes from the same
ephemeral range), and with pytest-xdist four workers ask at once. CI failed that way: a
Modbus client of one worker took the port another worker was about to listen on.

So the ports handed out here lie *below* the ephemeral range, where the kernel never picks a
source port, each xdist worker has its own slice, and no process hands out a number twice.
"""

from __future__ import annotations

import itertools
import os
import socket

_SLICE = 1500  # ports per worker; a full test run uses a few hundred
_FLOOR = 10000  # stay clear of well-known ports and common local services


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux' default


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ... ; absent without -n
    digits = worker.lstrip("gw")
    return int(digits) if digits.isdigit() else 0


def _candidates() -> itertools.cycle[int]:
    slices = max(1, (_ephemeral_floor() - _FLOOR) // _SLICE)
    start = _FLOOR + (_worker_index() % slices) * _SLICE
    # Start at a different place in the slice each run, so a port left in TIME_WAIT by the last
    # run is not the first one tried.
    offset = os.getpid() % _SLICE
    return itertools.cycle([start + (offset + i) % _SLICE for i in range(_SLICE)])


_next = _candidates()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now and that no other test of this run will be given."""
    for _ in range(_SLICE):
        port = next(_next)
        with socket.socket() as s:
            # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in this worker's slice of {_SLICE}")
