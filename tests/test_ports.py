"""The tests' port allocator: what keeps four xdist workers from binding each other's ports."""

import itertools
import socket

import ports


def test_ports_are_below_the_ephemeral_range_and_never_handed_out_twice():
    floor = ports._ephemeral_floor()
    given = [ports.free_port() for _ in range(200)]
    assert len(set(given)) == len(given)
    assert all(1024 < port < floor for port in given)


def test_a_port_someone_listens_on_is_skipped(monkeypatch):
    port = ports.free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        monkeypatch.setattr(ports, "_next", itertools.chain([port], ports._next))
        assert ports.free_port() != port
